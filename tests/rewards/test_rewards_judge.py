"""vlm_judge (P(yes) from first-token log-probabilities) and geneval (compositional checks) rewards.

vlm_judge runs against a fake OpenAI-compatible server on 127.0.0.1 that answers in vLLM's logprobs format, and a
tiny random LLaVA in process; geneval runs on images drawn exactly like the toy world's renderer (shapes detector)
and on a tiny random OWLv2 + tiny open_clip (plumbing only: random models find random things).
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import threading

os.environ["HF_HUB_OFFLINE"] = "1"

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ddpo_cli.config import compose, validate  # noqa: E402
from ddpo_cli.errors import UserError  # noqa: E402
from ddpo_cli.prompts.benchmarks import geneval  # noqa: E402
from ddpo_cli.toyworld.prompts import shapes_geneval, toy_geneval_metadata  # noqa: E402
from ddpo_cli.rewards.geneval import GenEval, relations  # noqa: E402
from ddpo_cli.rewards.vlm import ServerVLM, to_pil  # noqa: E402
from ddpo_cli.rewards.vlm_judge import VLMJudge  # noqa: E402
from ddpo_cli.toyworld.render import PALETTE, shape_mask  # noqa: E402
from reward_contract import check_contract  # noqa: E402
from tiny_judge_models import build_geneval, build_tiny_open_clip, build_tiny_owl, build_vlm_judge  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "geneval_sample.jsonl"
# The fake server's first-token distribution for a red image (a blue one swaps " Yes" and " No").
RED_LOGPROBS = {" Yes": -0.4, "Yes": -2.0, " No": -1.6, "The": -3.0}


def flat_images(colours: list[tuple[int, int, int]], size: int = 32) -> torch.Tensor:
    """``[B,3,size,size]`` flat-colour images in [0,1]."""
    return torch.tensor(colours, dtype=torch.float32).div(255).view(-1, 3, 1, 1).expand(-1, 3, size, size).clone()


# ------------------------------------------------------------------------------------------------ vlm_judge: server
class FakeJudgeServer:
    """``POST /<mode>/v1/chat/completions`` -> one token with vLLM-format top_logprobs, chosen by the image colour.

    normal: RED_LOGPROBS (red image) or the same with yes/no swapped | yes_only: " Yes" -0.1, "The" -2.5 |
    neither: "The" -0.1, "A" -2.5 | absurd: " Yes" 1e308 | plain: a chat completion without logprobs."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = self.path.split("/")[1]
                server.requests.append((mode, body))
                data = json.dumps(server.reply(mode, body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, mode: str) -> str:
        return f"{self.base}/{mode}/v1"

    @staticmethod
    def reply(mode: str, body: dict) -> dict:
        if mode == "plain":
            return {"choices": [{"message": {"role": "assistant", "content": "Yes"}}]}
        data = body["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1]
        red, _, blue = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").getpixel((0, 0))
        swap = {" Yes": " No", " No": " Yes"} if blue > red else {}
        table = {"normal": {swap.get(t, t): lp for t, lp in RED_LOGPROBS.items()},
                 "yes_only": {" Yes": -0.1, "The": -2.5}, "neither": {"The": -0.1, "A": -2.5},
                 "absurd": {" Yes": 1e308, " No": -0.1}}[mode]
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in table.items()]
        best = max(top, key=lambda entry: entry["logprob"])
        return {"choices": [{"message": {"role": "assistant", "content": best["token"]},
                             "logprobs": {"content": [{**best, "top_logprobs": top[:body["top_logprobs"]]}]}}]}


@pytest.fixture(scope="module")
def server():
    fake = FakeJudgeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def softmax_share(yes: list[float], no: list[float]) -> float:
    """By hand: the yes share of exp(logprob) over the yes and no entries."""
    p_yes, p_no = sum(math.exp(v) for v in yes), sum(math.exp(v) for v in no)
    return p_yes / (p_yes + p_no)


def test_server_judge_asks_for_one_token_with_logprobs_and_renormalises_yes_over_yes_and_no(server):
    reward = VLMJudge(backend="server", model="judge", server_url=server.url("normal"), top_logprobs=5)
    rewards, info = check_contract(reward, flat_images([(255, 0, 0), (0, 0, 255)]), ["a red apple", "a red apple"],
                                   [{}, {}])
    red = softmax_share([-0.4, -2.0], [-1.6])          # " Yes" and "Yes" vs " No"; "The" is neither
    blue = softmax_share([-1.6, -2.0], [-0.4])
    torch.testing.assert_close(rewards, torch.tensor([red, blue]))
    assert info["p_yes_raw"][0] == pytest.approx(math.exp(-0.4) + math.exp(-2.0))
    assert info["p_no_raw"][0] == pytest.approx(math.exp(-1.6)) and info["yes_no_found"] == [True, True]
    body = [b for m, b in server.requests if m == "normal"][-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 1
    assert body["model"] == "judge" and body["temperature"] == 0.0
    assert body["messages"][0]["content"][1]["text"] == "Does this image show a red apple? Answer yes or no."


def test_server_judge_absent_sides(server):
    only_yes = VLMJudge(backend="server", server_url=server.url("yes_only"))
    rewards, info = only_yes(flat_images([(255, 0, 0)]), ["x"], [{}])
    assert rewards.tolist() == [1.0] and info["p_no_raw"] == [0.0]           # no "no" in the top-K: P(no) = 0
    mixed = VLMJudge(backend="server", server_url=server.url("normal"), top_logprobs=1)
    rewards, info = mixed(flat_images([(255, 0, 0)]), ["x"], [{}])
    assert rewards.tolist() == [1.0]                                          # top-1 is " Yes" only
    neither = VLMJudge(backend="server", server_url=server.url("neither"))
    with pytest.raises(UserError, match="none of") as error:                  # a whole batch without yes/no
        neither(flat_images([(255, 0, 0), (0, 0, 255)]), ["x", "y"], [{}, {}])
    assert "reward.yes_tokens" in str(error.value) and "\n" not in str(error.value)


def test_an_image_with_neither_answer_gets_one_half_in_a_batch_with_answers(server, monkeypatch):
    reward = VLMJudge(backend="server", server_url=server.url("normal"))
    masses = torch.tensor([[0.6, 0.2], [0.0, 0.0]])
    monkeypatch.setattr(reward, "masses", lambda images, questions: masses)
    rewards, info = check_contract(reward, flat_images([(255, 0, 0)] * 2), ["x", "y"], [{}, {}])
    assert rewards.tolist() == [0.75, 0.5] and info["yes_no_found"] == [True, False]


def test_a_server_giving_absurd_log_probabilities_is_a_one_line_error(server):
    # issue #23's probe: exp(1e308) overflowed into a traceback
    reward = VLMJudge(backend="server", server_url=server.url("absurd"))
    with pytest.raises(UserError, match=r"gave the token ' Yes' the log-probability 1e\+308, which is none") as error:
        reward(flat_images([(255, 0, 0)]), ["x"], [{}])
    assert "\n" not in str(error.value)


def test_server_without_logprobs_is_a_one_line_error(server):
    vlm = ServerVLM(server.url("plain"), max_retries=0)
    with pytest.raises(UserError, match="top_logprobs") as error:
        vlm.yes_no_probabilities([Image.new("RGB", (8, 8))], ["q"], ["Yes"], ["No"])
    assert "\n" not in str(error.value)


def test_judge_options_are_checked():
    with pytest.raises(UserError, match="both"):
        VLMJudge(yes_tokens=["Yes", "No"])
    with pytest.raises(UserError, match="top_logprobs"):
        VLMJudge(top_logprobs=0)
    reward = VLMJudge(question="Is there a {animal}?")
    assert reward.ask("a cat", {"animal": "cat"}) == "Is there a cat?"
    with pytest.raises(UserError, match="animal"):
        reward.ask("a cat", {})


# ------------------------------------------------------------------------------------------ vlm_judge: transformers
@pytest.fixture(scope="module")
def judge_overrides(tmp_path_factory) -> list[str]:
    return build_vlm_judge(tmp_path_factory.mktemp("judge"))


def test_transformers_judge_equals_the_models_own_first_token_softmax(judge_overrides):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = judge_overrides[1].split("=", 1)[1]
    reward = VLMJudge(backend="transformers", model=folder, batch_size=2)
    images = flat_images([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    prompts = ["a red square", "a blue sky", "green grass"]
    rewards, info = check_contract(reward, images, prompts, [{}, {}, {}])  # batches of 2 then 1, left-padded

    processor, model = AutoProcessor.from_pretrained(folder), LlavaForConditionalGeneration.from_pretrained(folder)
    yes_id, no_id = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("yes</w>", "no</w>"))  # CLIP BPE: lower
    assert reward.vlm.token_ids(reward.yes_tokens) == [yes_id] and reward.vlm.token_ids(reward.no_tokens) == [no_id]
    for i, (image, prompt) in enumerate(zip(to_pil(images), prompts)):  # one image at a time, via generate
        question = f"Does this image show {prompt}? Answer yes or no."
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template([chat], add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        probs = out.logits[0][0].softmax(-1)
        assert info["p_yes_raw"][i] == pytest.approx(probs[yes_id].item(), rel=1e-4)
        assert rewards[i].item() == pytest.approx((probs[yes_id] / (probs[yes_id] + probs[no_id])).item(), rel=1e-4)


def test_transformers_judge_without_single_token_variants_is_a_user_error(judge_overrides):
    folder = judge_overrides[1].split("=", 1)[1]
    reward = VLMJudge(backend="transformers", model=folder, yes_tokens=["absolutely certainly"])
    with pytest.raises(UserError, match="single token"):
        reward(flat_images([(255, 0, 0)]), ["x"], [{}])


def test_build_vlm_judge_overrides_make_a_train_config(judge_overrides):
    plan = validate(compose("train", ["model=tiny", "reward=vlm_judge", *judge_overrides]))
    rewards, _ = check_contract(plan.reward, flat_images([(255, 0, 0)]), ["a cat"], [{}])
    assert 0.0 < rewards.item() < 1.0


# ------------------------------------------------------------------------------------------- geneval: toy world
def draw(*objects: tuple[str, str, int, int, int], size: int = 32) -> torch.Tensor:
    """Shapes ``(kind, colour, top, left, side)`` drawn like the toy renderer -> ``[3, size, size]`` in [0,1]."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for kind, colour, top, left, side in objects:
        image[top:top + side, left:left + side][shape_mask(kind, side)] = PALETTE[colour]
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def counting(count: int, colour: str, shape: str) -> dict:
    return toy_geneval_metadata({"count": count, "colour": colour, "shape": shape})


POSITION = {"tag": "position", "include": [{"class": "circle", "count": 1},
                                           {"class": "square", "count": 1, "position": ["left of", 0]}]}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "red"},
                                               {"class": "circle", "count": 1, "color": "blue"}]}
LEFT_SQUARE, RIGHT_CIRCLE = ("square", "red", 12, 2, 8), ("circle", "blue", 12, 22, 8)
RIGHT_SQUARE, LEFT_CIRCLE = ("square", "red", 12, 22, 8), ("circle", "blue", 12, 2, 8)


@pytest.mark.parametrize("objects, meta, correct, fraction", [
    ([("circle", "red", 2, 2, 9), ("circle", "red", 20, 20, 9)], counting(2, "red", "circle"), True, 1.0),
    ([("circle", "red", 2, 2, 9)], counting(2, "red", "circle"), False, 1 / 3),               # count (and colour)
    ([("circle", "red", 2, 2, 9), ("circle", "red", 20, 20, 9), ("circle", "red", 2, 20, 9)],
     counting(2, "red", "circle"), False, 2 / 3),                                              # exclude: 3 >= 3
    ([("circle", "red", 2, 2, 9), ("circle", "blue", 20, 20, 9)], counting(2, "red", "circle"), False, 2 / 3),
    ([("square", "red", 2, 2, 9), ("square", "red", 20, 20, 9)], counting(2, "red", "circle"), False, 1 / 3),
    ([LEFT_SQUARE, RIGHT_CIRCLE], POSITION, True, 1.0),
    ([RIGHT_SQUARE, LEFT_CIRCLE], POSITION, False, 2 / 3),                                     # position
    ([("square", "red", 2, 12, 8), ("circle", "blue", 22, 12, 8)], POSITION, False, 2 / 3),   # above, not left
    ([("square", "red", 2, 12, 8)], POSITION, False, 1 / 3),                                   # no target circle
    ([LEFT_SQUARE, RIGHT_CIRCLE], COLOR_ATTR, True, 1.0),
    ([("square", "blue", 12, 2, 8), ("circle", "red", 12, 22, 8)], COLOR_ATTR, False, 2 / 4),  # colours swapped
])
def test_geneval_checks_on_toy_images(objects, meta, correct, fraction):
    strict, graded = GenEval(detector="shapes"), GenEval(detector="shapes", graded=True)
    image = draw(*objects)[None]
    rewards, info = strict(image, ["p"], [meta])
    assert info["correct"] == [correct] and rewards.tolist() == [float(correct)]
    assert info["fraction_passed"][0] == pytest.approx(fraction), info["checks"]
    assert graded(image, ["p"], [meta])[0].item() == pytest.approx(fraction)


def test_geneval_shapes_batch_contract_and_logged_checks():
    images = torch.stack([draw(LEFT_SQUARE, RIGHT_CIRCLE), draw(RIGHT_SQUARE, LEFT_CIRCLE)])
    images = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")  # 64 px: resized to 32
    rewards, info = check_contract(GenEval(detector="shapes"), images, ["p", "q"], [POSITION, POSITION])
    assert rewards.tolist() == [1.0, 0.0]
    assert info["checks"][1] == ("pass 1 circle (found 1); pass 1 square (found 1); "
                                 "FAIL square left of circle (found right of)")


def test_geneval_relations_follow_geneval_rule():
    assert relations((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}       # dx = -(20 - 0.1*20)/20 = -0.9
    assert relations((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert relations((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}          # y points down
    assert relations((0, 0, 10, 10), (10, 10, 20, 20)) == {"left of", "above"}  # dx = dy = -8/14.14 = -0.566
    assert relations((0, 0, 10, 10), (10, 10, 20, 20), threshold=0.3) == set()  # -4/14.14 = -0.28: neither
    assert relations((0, 0, 10, 10), (1, 1, 9, 9)) == set()                 # same centre


def test_geneval_needs_geneval_metadata_and_known_classes():
    reward = GenEval(detector="shapes")
    with pytest.raises(UserError, match="prompts=geneval") as error:
        reward(draw(LEFT_SQUARE)[None], ["a cat"], [{}])
    assert "\n" not in str(error.value)
    cat = {"include": [{"class": "cat", "count": 1}]}
    with pytest.raises(UserError, match="class_map"):
        reward(draw(LEFT_SQUARE)[None], ["a cat"], [cat])
    assert GenEval(detector="shapes", class_map={"cat": "square"})(draw(LEFT_SQUARE)[None], ["a cat"], [cat])[0] == 1
    with pytest.raises(UserError, match="colour 'purple'"):
        reward(draw(LEFT_SQUARE)[None], ["p"], [{"include": [{"class": "square", "count": 1, "color": "purple"}]}])
    with pytest.raises(UserError, match="detector"):
        GenEval(detector="yolo")


def test_geneval_prompt_sets(tmp_path):
    prompts = geneval(str(SAMPLE))  # one line per GenEval tag, in GenEval's evaluation_metadata.jsonl format
    assert len(prompts) == 6 and prompts.prompts[2] == "a photo of three dogs"
    assert prompts.items[4][1]["include"][1]["position"] == ["above", 0]
    assert {meta["tag"] for _, meta in prompts.items} == {"single_object", "two_object", "counting", "colors",
                                                          "position", "color_attr"}
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text('{"prompt": "no include"}\n')
    with pytest.raises(UserError, match="line 1"):
        geneval(str(path))
    with pytest.raises(UserError, match="prompts.path"):
        geneval(str(tmp_path / "missing.jsonl"))
    toy = shapes_geneval()
    assert len(toy) == 38 and toy.items[0][1]["exclude"] == [{"class": "circle", "count": 2}]


def test_geneval_prompts_path_is_required_one_line():
    from ddpo_cli.cli import preflight

    with pytest.raises(UserError, match="prompts.path") as error:
        preflight("train", ["prompts=geneval"], False, None, lambda cfg, config_dir: validate(cfg))
    assert "\n" not in str(error.value)


def test_build_geneval_overrides_make_a_train_config(tmp_path):
    plan = validate(compose("train", ["model=tiny", "reward=geneval", *build_geneval(tmp_path)]))
    prompts, metadata = plan.prompts.draw(4, random.Random(0))
    check_contract(plan.reward, torch.rand(4, 3, 32, 32), prompts, metadata)
    with pytest.raises(UserError, match="GenEval metadata"):
        validate(compose("train", ["model=tiny", "reward=geneval", "reward.detector=shapes"])).reward(
            torch.rand(1, 3, 32, 32), ["cat"], [{"animal": "cat"}])


# ------------------------------------------------------------------------------------------------- geneval: OWL
@pytest.fixture(scope="module")
def owl_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("geneval_owl")
    return {"model": build_tiny_owl(root / "owl"), "clip_model": build_tiny_open_clip(root / "clip"),
            "clip_pretrained": None}


def test_geneval_owl_backend_plumbing(owl_models):
    images = flat_images([(255, 0, 0), (0, 0, 255)])
    meta = {"include": [{"class": "cat", "count": 2, "color": "red"}], "exclude": [{"class": "dog", "count": 17}]}
    nothing = GenEval(detector="owl", threshold=1.0, **owl_models)
    rewards, info = check_contract(nothing, images, ["p", "q"], [meta, meta])
    assert rewards.tolist() == [0.0, 0.0] and info["checks"][0].startswith("FAIL 2 cat (found 0)")
    everything = GenEval(detector="owl", threshold=0.0, nms_iou=1.0, colours=["red"], batch_size=1, **owl_models)
    rewards, info = check_contract(everything, images, ["p", "q"], [meta, meta])
    assert info["checks"][0] == ("pass 2 cat (found 16); pass 2 red cat (found red, red); "
                                 "pass fewer than 17 dog (found 16)")
    assert rewards.tolist() == [1.0, 1.0]
    two = GenEval(detector="owl", threshold=0.0, colours=["red", "blue"], graded=True, **owl_models)
    rewards, info = check_contract(two, images, ["p", "q"], [meta, meta])
    seen = info["checks"][0].split("red cat (found ")[1].split(")")[0].split(", ")
    assert len(seen) == 2 and set(seen) <= {"red", "blue"}
    # issue #23: GenEval counts with a 0.9 score threshold and checks everything else at 0.3
    counting = {**meta, "tag": "counting"}
    strict_counts = GenEval(detector="owl", threshold=0.0, counting_threshold=1.0, nms_iou=1.0, **owl_models)
    _, info = check_contract(strict_counts, images, ["p", "q"], [meta, counting])
    assert "(found 16)" in info["checks"][0] and info["checks"][1].startswith("FAIL 2 cat (found 0)")
    prompts = geneval(str(SAMPLE))  # every GenEval tag through the OWL path (position, colour, exclude)
    images = flat_images([(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (0, 0, 0), (255, 255, 255)])
    _, info = check_contract(GenEval(detector="owl", threshold=0.0, **owl_models), images, prompts.prompts,
                             [meta for _, meta in prompts.items])
    assert "train above bird" in info["checks"][4]
