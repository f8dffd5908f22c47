"""An embedded toy world (the project's MNIST): procedural shape images, a detector, prompt sets, a tiny model.

- :mod:`.render`:  ``render(count, colour, shape, seed)`` -> uint8 ``[32, 32, 3]``; captions like "two red circles";
- :mod:`.detect`:  ``detect(image)`` -> objects (colour, shape, area, bbox); ``check(objects, metadata)``;
- :mod:`.prompts`: ``shapes_train()`` / ``shapes_heldout()`` prompt sets (10 of 48 combos held out);
- the counting reward is :class:`ddpo_cli.rewards.shapes_counting.ShapesCounting`;
- the pretrained model lives in ``ddpo_cli/assets/tiny_shapes`` (built by ``scripts/train_tiny_shapes.py``).
"""
from .detect import Detection, check, detect, summarise
from .prompts import HELDOUT, shapes_heldout, shapes_train
from .render import COLOURS, COUNTS, SHAPES, caption, metadata, render, render_dataset

__all__ = ["COLOURS", "COUNTS", "SHAPES", "HELDOUT", "Detection", "caption", "check", "detect", "metadata", "render",
           "render_dataset", "shapes_heldout", "shapes_train", "summarise"]
