"""Offline Diffusion-DPO: the pairs file (every bad line a one-line error), the VAE encoding of given images, the
epoch's draw of pairs, and a run from the command line on the toy world."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ddpo, read_metrics
from ddpo_cli.errors import UserError
from ddpo_cli.preferences import pairs_from_samples, read_pairs_file
from ddpo_cli.toyworld.preference_pairs import write_preference_pairs


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    return write_preference_pairs(tmp_path_factory.mktemp("pairs"), 8, seed=0)


def test_the_toy_world_writes_pairs_that_prefer_the_asked_count(toy_pairs):
    from PIL import Image

    from ddpo_cli.toyworld.detect import detect, summarise

    pairs = read_pairs_file(toy_pairs)
    assert len(pairs) == 8
    for pair in pairs:
        count = summarise(detect(np.asarray(Image.open(pair.chosen))))["count"]
        wrong = summarise(detect(np.asarray(Image.open(pair.rejected))))["count"]
        assert pair.prompt.split()[0] == {1: "one", 2: "two", 3: "three", 4: "four"}[count] and wrong != count


@pytest.mark.parametrize("line,problem", [
    ("not json", "is not JSON"), ('{"prompt": "a"}', "needs the string keys"),
    ('{"prompt": "a", "chosen": "missing.png", "rejected": "missing.png"}', "does not exist"),
])
def test_a_bad_line_is_one_error_naming_it(tmp_path, line, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=f"line 1.*{problem}|{problem}"):
        read_pairs_file(path)
    with pytest.raises(UserError, match="no such file"):
        read_pairs_file(tmp_path / "absent.jsonl")


def test_pairs_from_scored_samples_put_the_kth_best_over_the_kth_worst_per_prompt(tmp_path):
    (tmp_path / "images").mkdir()
    rewards = {"a cat": [0.2, 0.9, 0.5, 0.1, 0.5], "a dog": [0.3, 0.3]}   # the dog's tie makes no pair
    rows = []
    for prompt, values in rewards.items():
        for i, value in enumerate(values):
            name = f"images/{prompt[2:]}_{i}.png"
            (tmp_path / name).write_bytes(b"")
            rows.append({"prompt": prompt, "file": name, "reward": value})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = read_pairs_file(pairs_from_samples(samples))
    assert [(p.prompt, p.chosen.name, p.rejected.name) for p in pairs] == [
        ("a cat", "cat_1.png", "cat_3.png"), ("a cat", "cat_2.png", "cat_0.png")]
    samples.write_text(json.dumps({"prompt": "a cat", "file": "images/cat_0.png"}) + "\n")
    with pytest.raises(UserError, match="no rewards.*reward="):
        pairs_from_samples(samples)


def test_encoding_an_image_and_decoding_it_gives_it_back(toy_pairs):
    from ddpo_cli.config import compose
    from ddpo_cli.models import load_model, resolve_model_path
    from ddpo_cli.preferences import load_image

    cfg = compose("train", ["model=tiny_shapes"])
    resolve_model_path(cfg.model)
    model = load_model(cfg.model, torch.device("cpu"), torch.float32, lora_seed=0)
    images = torch.stack([load_image(p.chosen, model.resolution) for p in read_pairs_file(toy_pairs)[:4]])
    back = model.decode(model.encode_images(images))
    # the shipped VAE reconstructs the toy world to ~1% (a wrong latent scaling is off by far more)
    assert float((back - images).abs().mean()) < 0.03


def test_epochs_walk_through_shuffled_passes_of_the_pairs():
    from ddpo_cli.pairs import OfflinePairs

    pairs = OfflinePairs.__new__(OfflinePairs)
    pairs.prompts = [str(i) for i in range(5)]
    first_pass, second_pass = pairs.order(0, 0, 5), pairs.order(0, 5, 5)
    assert sorted(first_pass) == sorted(second_pass) == list(range(5)) and first_pass != second_pass
    assert pairs.order(0, 3, 4) == first_pass[3:] + second_pass[:2]


def test_dpo_offline_trains_from_the_command_line_and_refuses_a_bad_file(toy_pairs, tmp_path, cache_dir):
    args = ["model=tiny_shapes", "prompts=shapes_train", "reward=shapes_counting", "algo=dpo_offline",
            "sampler.num_steps=4", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1", "train.batch_size=2",
            "train.num_epochs=1", "monitor.every=0", "log.tracker=none", "threads=2", "train.lr=1e-3"]
    run = tmp_path / "run"
    result = ddpo("train", *args, f"algo.pairs_file={toy_pairs}", f"hydra.run.dir={run}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    row = read_metrics(run)[0]
    assert row["global_step"] == 2 and row["paired_fraction"] == 1.0 and np.isfinite(row["loss"]), row
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "one red circle", "chosen": "nowhere.png", "rejected": "nowhere.png"}))
    refused = ddpo("train", *args, f"algo.pairs_file={bad}", f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode == 2 and "does not exist" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
