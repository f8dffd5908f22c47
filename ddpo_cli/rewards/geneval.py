"""GenEval-style compositional checks (Ghosh et al. 2023, github.com/djghosh13/geneval) as a reward.

Each prompt's metadata is one line of GenEval's ``evaluation_metadata.jsonl`` (``prompts=geneval``), e.g.::

    {"tag": "position", "prompt": "a photo of a dog left of a cat",
     "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}

Checks, as GenEval makes them (``include`` clauses must all hold, any violated ``exclude`` clause fails):

- count: at least ``count`` objects of ``class`` detected; the ``count`` most confident ones are that clause's objects;
- colour (``"color"``): at least ``count`` of those objects have that colour;
- position (``"position": [relation, i]``): every one of those objects stands in ``relation`` (left of, right of,
  above, below) to every object of include clause ``i`` (which must itself have passed). From box centres:
  ``offset = centre_a - centre_b``, shrunk towards 0 by ``position_threshold * (size_a + size_b)`` per axis; the
  relation holds when the shrunk offset, divided by the length of the unshrunk one, is beyond 0.5 along it
  (x: left of < -0.5, right of > 0.5; y, pointing down: above < -0.5, below > 0.5);
- exclude: fewer than ``count`` objects of ``class`` detected (a counting prompt excludes ``count + 1``).

A colour or position check whose count check failed fails too. Reward: 1 if every check passes, else 0 (GenEval's
strict score), or with ``graded: true`` the fraction of checks passed. ``info`` logs ``correct`` (strict),
``fraction_passed`` and ``checks`` (each check, passed or failed, with what was found).

Detectors (``detector``):

- ``shapes``: the toy world's exact detector (``ddpo_cli/toyworld/detect.py``): a class is a shape kind (circle,
  square, triangle; ``class_map`` maps other names to them), colours are the palette's (red, green, blue, yellow),
  an object's confidence is its area;
- ``owl``: OWLv2 / OWL-ViT boxes for "a photo of a {class}" above ``threshold`` after NMS (GenEval uses
  Mask2Former), ``counting_threshold`` for prompts tagged ``counting`` (GenEval's 0.3 and 0.9); colour by CLIP
  zero-shot over ``colours`` on the box crop with GenEval's three templates (open_clip ``clip_model`` +
  ``clip_pretrained``, or ``clip_model=local-dir:/folder``). GenEval classifies the colour of the object's mask
  with the background blurred away; the crop here is the whole box, so background inside it takes part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..images import to_uint8_hwc
from ..errors import UserError
from ..toyworld.detect import detect
from ..toyworld.render import COLOURS as TOY_COLOURS
from ..toyworld.render import SHAPES
from .base import Reward, resize_square
from .clip import load_open_clip
from .counting import OwlCounter, boxes_kept
from .vlm import to_pil

GENEVAL_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ("left of", "right of", "above", "below")
COLOUR_TEMPLATES = ("a photo of a {colour} {name}", "a photo of a {colour}-colored {name}",
                    "a photo of a {colour} object")


@dataclass
class Found:
    """One detected object: its box ``(x1, y1, x2, y2)`` in pixels (y down) and its confidence."""

    box: tuple[float, float, float, float]
    score: float
    colour: str | None = None   # known at detection (shapes); None: the detector's ``colours`` decides


@dataclass
class Check:
    """One GenEval check of one image: what was required, whether it held, what was found."""

    required: str
    passed: bool
    found: str

    def __str__(self) -> str:
        return f"{'pass' if self.passed else 'FAIL'} {self.required} (found {self.found})"


def relations(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """Where box A is relative to box B (GenEval's rule, see the module docstring): a subset of RELATIONS."""
    centre_a, centre_b = [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) for box in (box_a, box_b)]
    sizes = [(box_a[2] - box_a[0]) + (box_b[2] - box_b[0]), (box_a[3] - box_a[1]) + (box_b[3] - box_b[1])]
    offset = [a - b for a, b in zip(centre_a, centre_b)]
    shrunk = [math.copysign(max(abs(o) - threshold * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    dx, dy = (v / math.hypot(*offset) for v in shrunk)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in found.items() if holds}


def run_checks(found: dict[str, list[Found]], meta: dict, colours_of, position_threshold: float = 0.1) -> list[Check]:
    """GenEval's checks of one image. ``found``: class -> objects, most confident first; ``colours_of(class,
    objects) -> colour names``; ``meta``: the image's GenEval metadata (include / exclude)."""
    checks, groups = [], []
    for req in meta.get("include", []):
        name, count = req["class"], req["count"]
        objects = found.get(name, [])[:count]
        ok = len(objects) >= count
        checks.append(Check(f"{count} {name}", ok, f"{len(found.get(name, []))}"))
        if "color" in req:
            seen = colours_of(name, objects) if ok else []
            ok = ok and seen.count(req["color"]) >= count
            checks.append(Check(f"{count} {req['color']} {name}", ok, ", ".join(seen) or "not checked"))
        if "position" in req:
            relation, target = req["position"]
            targets = groups[target]
            seen = [relations(a.box, b.box, position_threshold) for a in objects for b in targets or []] if ok else []
            ok = ok and targets is not None and all(relation in rels for rels in seen)
            shown = "; ".join(" and ".join(sorted(rels)) or "no relation" for rels in seen) or "not checked"
            checks.append(Check(f"{name} {relation} {meta['include'][target]['class']}", ok, shown))
        groups.append(objects if ok else None)
    for req in meta.get("exclude", []):
        number = len(found.get(req["class"], []))
        checks.append(Check(f"fewer than {req['count']} {req['class']}", number < req["count"], f"{number}"))
    return checks


def check_metadata(meta: dict, prompt: str, colour_names: list[str]) -> None:
    """UserError unless ``meta`` is GenEval metadata this detector can check (classes, counts, colours, positions)."""
    if not (isinstance(meta.get("include"), list) and meta["include"]):
        raise UserError(f"the geneval reward needs GenEval metadata (include/exclude lists), which {prompt!r} does "
                        "not have: use prompts=geneval prompts.path=<evaluation_metadata.jsonl>, or "
                        "prompts=shapes_geneval for the toy world")
    for index, req in enumerate(meta["include"] + meta.get("exclude", [])):
        if not (isinstance(req, dict) and isinstance(req.get("class"), str) and isinstance(req.get("count"), int)):
            raise UserError(f"GenEval metadata of {prompt!r}: {req!r} needs a class (text) and a count (integer)")
        if "color" in req and req["color"] not in colour_names:
            raise UserError(f"GenEval metadata of {prompt!r} asks for colour {req['color']!r}, which this detector "
                            f"does not tell: it knows {colour_names} (reward.colours for owl)")
        if "position" in req:
            relation, target = req["position"]
            if relation not in RELATIONS or not (isinstance(target, int) and 0 <= target < index):
                raise UserError(f"GenEval metadata of {prompt!r}: position {req['position']!r} must be [relation, i] "
                                f"with a relation of {list(RELATIONS)} and i an earlier include clause")


def batch_classes(metadata: list[dict]) -> list[str]:
    """Every class any include or exclude clause of the batch names, sorted."""
    return sorted({req["class"] for meta in metadata for req in meta["include"] + meta.get("exclude", [])})


class ShapesDetector:
    """The toy world's detector: GenEval classes are shape kinds (via ``class_map``), colours the palette's.

    Images are resized to ``size`` (the world's 32 px; area when shrinking); regions under ``min_area`` pixels are
    noise. Boxes are in pixels at ``size``; an object's confidence is its area."""

    def __init__(self, class_map: dict[str, str] | None = None, size: int = 32, min_area: int = 6) -> None:
        self.class_map, self.size, self.min_area = dict(class_map or {}), size, min_area
        self.colour_names = list(TOY_COLOURS)

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to load: the detector is a rule."""

    def kind(self, name: str) -> str:
        """The shape kind a GenEval class stands for."""
        kind = self.class_map.get(name, name)
        if kind not in SHAPES:
            raise UserError(f"the shapes detector knows {SHAPES}, not {name!r}: map it with "
                            f"reward.class_map='{{{name}: circle}}' or use reward.detector=owl")
        return kind

    def find(self, images: torch.Tensor, classes: list[str], thresholds: list[float]) -> list[dict[str, list[Found]]]:
        """``[B,3,H,W]`` in [0,1] -> per image, class -> its objects, largest first (``thresholds``: unused, every
        region is certain)."""
        kinds = {name: self.kind(name) for name in classes}
        results = []
        for array in to_uint8_hwc(resize_square(images, self.size)):
            objects = sorted(detect(array, self.min_area), key=lambda d: -d.area)
            results.append({name: [Found((d.bbox[1], d.bbox[0], d.bbox[3], d.bbox[2]), d.area, d.colour)
                                   for d in objects if d.shape == kind] for name, kind in kinds.items()})
        return results

    def colours(self, image: torch.Tensor, objects: list[Found], name: str) -> list[str]:
        """The colours found with the objects (exact in the toy world)."""
        return [o.colour for o in objects]


class OwlDetector:
    """OWLv2 / OWL-ViT boxes per class (``query`` formatted with ``{class}``) and CLIP zero-shot colours.

    A class keeps the boxes scoring above ``threshold`` after NMS at ``nms_iou``, at most ``max_objects``, most
    confident first. Box coordinates are scaled by the longer image side (OWLv2 pads images to a square)."""

    def __init__(self, model: str, query: str, threshold: float, nms_iou: float, max_objects: int, batch_size: int,
                 clip_model: str, clip_pretrained: str | None, colours: list[str]) -> None:
        self.owl = OwlCounter(model, threshold=threshold, nms_iou=nms_iou, batch_size=batch_size)
        self.query, self.max_objects = query, max_objects
        self.clip_model, self.clip_pretrained, self.colour_names = clip_model, clip_pretrained, list(colours)
        self._classifiers: dict[str, torch.Tensor] = {}

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        self.owl.load(device, dtype)
        self.clip, self.preprocess, self.tokenizer = load_open_clip(self.clip_model, self.clip_pretrained, device,
                                                                    dtype)
        self.device, self.clip_dtype, self._classifiers = device, dtype, {}

    @torch.no_grad()
    def find(self, images: torch.Tensor, classes: list[str], thresholds: list[float]) -> list[dict[str, list[Found]]]:
        """``[B,3,H,W]`` in [0,1] -> per image, class -> its objects scoring above the image's threshold, most
        confident first."""
        pil_images, side = to_pil(images), max(images.shape[-2:])
        queries = [self.query.format_map({"class": name}) for name in classes]
        results = []
        for start in range(0, len(pil_images), self.owl.batch_size):
            chunk = pil_images[start:start + self.owl.batch_size]
            inputs = self.owl.processor(text=[queries] * len(chunk), images=chunk, return_tensors="pt")
            outputs = self.owl.model(**inputs.to(self.device))
            for scores, boxes in zip(outputs.logits.sigmoid().float(), outputs.pred_boxes.float()):  # [P,Q], [P,4]
                threshold = thresholds[len(results)]
                results.append({name: self.keep(scores[:, q], boxes * side, threshold)
                                for q, name in enumerate(classes)})
        return results

    def keep(self, scores: torch.Tensor, boxes: torch.Tensor, threshold: float) -> list[Found]:
        """``scores [P]``, ``boxes [P,4]`` (cx, cy, w, h in pixels) -> the objects above ``threshold`` after NMS,
        best first, at most ``max_objects``."""
        scores, corners = boxes_kept(scores, boxes, threshold, self.owl.nms_iou)
        return [Found(tuple(box), float(score))
                for score, box in zip(scores[:self.max_objects].tolist(), corners[:self.max_objects].tolist())]

    @torch.no_grad()
    def colours(self, image: torch.Tensor, objects: list[Found], name: str) -> list[str]:
        """``image [3,H,W]`` in [0,1] -> the colour of each object: CLIP zero-shot over ``colour_names`` on its crop."""
        if not objects:
            return []
        picture = to_pil(image[None])[0]
        crops = [picture.crop(pixel_box(o.box, picture.width, picture.height)) for o in objects]
        pixels = torch.stack([self.preprocess(crop) for crop in crops]).to(self.device, self.clip_dtype)
        features = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)  # [N, D]
        return [self.colour_names[i] for i in (features @ self.colour_classifier(name).T).argmax(-1).tolist()]

    def colour_classifier(self, name: str) -> torch.Tensor:
        """``[C, D]``: per colour, the normalised mean of the normalised text embeddings of the three templates."""
        if name not in self._classifiers:
            texts = [t.format(colour=c, name=name) for c in self.colour_names for t in COLOUR_TEMPLATES]
            tokens = self.tokenizer(texts).to(self.device)
            embeddings = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            means = embeddings.view(len(self.colour_names), len(COLOUR_TEMPLATES), -1).mean(1)
            self._classifiers[name] = F.normalize(means, dim=-1)
        return self._classifiers[name]


def pixel_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A float box ``(x1, y1, x2, y2)`` -> integer pixel bounds inside the image, at least one pixel wide and high."""
    x1, y1 = min(max(int(box[0]), 0), width - 1), min(max(int(box[1]), 0), height - 1)
    return x1, y1, max(min(math.ceil(box[2]), width), x1 + 1), max(min(math.ceil(box[3]), height), y1 + 1)


class GenEval(Reward):
    """GenEval's strict score (1 if every check passes, else 0) or, with ``graded``, the fraction passed.

    ``detector``: ``shapes`` (toy world; ``class_map``, ``size``, ``min_area``) or ``owl`` (``model``, ``query``,
    ``threshold`` (``counting_threshold`` on prompts tagged ``counting``), ``nms_iou``, ``max_objects``,
    ``batch_size``; colours by ``clip_model``/``clip_pretrained`` over ``colours``). ``position_threshold`` is GenEval's margin (a fraction of the two boxes' summed sizes). Not
    differentiable.
    """

    name = "geneval"
    output_range = (0.0, 1.0)

    def __init__(self, detector: str = "owl", graded: bool = False, position_threshold: float = 0.1,
                 model: str = "google/owlv2-base-patch16-ensemble", query: str = "a photo of a {class}",
                 threshold: float = 0.3, counting_threshold: float = 0.9, nms_iou: float = 0.5, max_objects: int = 16, batch_size: int = 8,
                 clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
                 colours: list[str] | None = None, class_map: dict[str, str] | None = None, size: int = 32,
                 min_area: int = 6) -> None:
        super().__init__()
        if detector == "shapes":
            self.detector = ShapesDetector(class_map, size=size, min_area=min_area)
        elif detector == "owl":
            self.detector = OwlDetector(model, query, threshold, nms_iou, max_objects, batch_size, clip_model,
                                        clip_pretrained, colours or GENEVAL_COLOURS)
        else:
            raise UserError(f"reward.detector={detector!r}: choose owl (real images) or shapes (the toy world)")
        self.graded, self.position_threshold = graded, position_threshold
        self.threshold, self.counting_threshold = threshold, counting_threshold

    def load(self) -> None:
        self.detector.load(self.device, self.dtype)

    def score(self, images, prompts, metadata):
        for prompt, meta in zip(prompts, metadata):
            check_metadata(meta, prompt, self.detector.colour_names)
        thresholds = [self.counting_threshold if meta.get("tag") == "counting" else self.threshold for meta in metadata]
        found = self.detector.find(images, batch_classes(metadata), thresholds)
        results = []
        for image, objects, meta in zip(images, found, metadata):
            def colours_of(name: str, objs: list[Found], image=image) -> list[str]:
                return self.detector.colours(image, objs, name)

            results.append(run_checks(objects, meta, colours_of, self.position_threshold))
        correct = [all(c.passed for c in checks) for checks in results]
        fraction = [sum(c.passed for c in checks) / len(checks) for checks in results]
        rewards = torch.tensor(fraction if self.graded else correct, dtype=torch.float32, device=images.device)
        return rewards, {"correct": correct, "fraction_passed": fraction,
                         "checks": ["; ".join(str(c) for c in checks) for checks in results]}
