"""The reward server's wire format, JSON both ways (never pickle).

Request: ``{"images": [...], "prompts": [str], "metadata": [object]}``, each image either ``{"png": <base64>}`` or
``{"uint8": <base64 of H*W*3 bytes, row-major RGB>, "shape": [H, W, 3]}``. Reply: ``{"rewards": [number or null],
"info": {key: [value per image]}}`` (null for a non-finite reward; JSON has no NaN).

Images travel as the 8-bit pictures the trainer would save (:func:`ddpo_cli.images.to_uint8_hwc`); the server
scores ``uint8 / 255``. A reward that rounds to 8 bits itself (JPEG) scores exactly what it would in process.
"""
from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np
import torch
from PIL import Image

from ..images import to_uint8_hwc

IMAGE_FORMATS = ("png", "uint8")
MAX_SIDE = 4096  # pixels: a larger image is refused before it is decoded


class WireError(ValueError):
    """A malformed request or reply, with a one-line reason."""


def encode_request(images: torch.Tensor, prompts: list[str], metadata: list[dict], image_format: str = "png") -> dict:
    """``images [B,3,H,W]`` in [0, 1] with their prompts and metadata, as a JSON-ready request."""
    items = []
    for array in to_uint8_hwc(images):
        if image_format == "png":
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
            items.append({"png": base64.b64encode(buffer.getvalue()).decode("ascii")})
        else:
            items.append({"uint8": base64.b64encode(array.tobytes()).decode("ascii"), "shape": list(array.shape)})
    return {"images": items, "prompts": list(prompts), "metadata": [dict(m) for m in metadata]}


def decode_request(body, max_images: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """``(images [B,3,H,W] float in [0, 1], prompts, metadata)`` of a request; WireError for anything malformed:
    not an object, lists of different lengths, no images or more than ``max_images``, an image that is not a PNG
    or raw bytes of its stated shape, larger than ``MAX_SIDE``, or of another size than the first."""
    if not isinstance(body, dict):
        raise WireError("the request is not a JSON object with images, prompts and metadata")
    images, prompts, metadata = body.get("images"), body.get("prompts"), body.get("metadata")
    if not all(isinstance(x, list) for x in (images, prompts, metadata)):
        raise WireError("images, prompts and metadata must each be a list")
    if not (len(images) == len(prompts) == len(metadata)):
        raise WireError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata: one of each "
                        f"per image")
    if not 1 <= len(images) <= max_images:
        raise WireError(f"{len(images)} images in one request: send 1 to {max_images}")
    if not all(isinstance(p, str) for p in prompts) or not all(isinstance(m, dict) for m in metadata):
        raise WireError("prompts must be strings and metadata objects")
    arrays = [decode_image(item, i) for i, item in enumerate(images)]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise WireError(f"images of different sizes in one request ({arrays[0].shape[:2]} and others): send one "
                        f"size per request")
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return stacked, prompts, metadata


def decode_image(item, index: int) -> np.ndarray:
    """One image of a request as ``[H, W, 3]`` uint8."""
    if not isinstance(item, dict) or not ({"png"} == item.keys() or {"uint8", "shape"} == item.keys()):
        raise WireError(f"image {index}: give {{'png': base64}} or {{'uint8': base64, 'shape': [H, W, 3]}}")
    try:
        data = base64.b64decode(item.get("png") or item.get("uint8"), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise WireError(f"image {index}: not base64") from None
    if "png" in item:
        return decode_png(data, index)
    shape = item["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and shape[2] == 3 and
            all(isinstance(s, int) and 1 <= s <= MAX_SIDE for s in shape[:2])):
        raise WireError(f"image {index}: shape must be [H, W, 3] with sides of 1 to {MAX_SIDE} pixels")
    if len(data) != shape[0] * shape[1] * 3:
        raise WireError(f"image {index}: {len(data)} bytes for shape {shape} ({shape[0] * shape[1] * 3} expected)")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def decode_png(data: bytes, index: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise WireError(f"image {index}: a {image.format} file, not a PNG")
            if max(image.size) > MAX_SIDE:
                raise WireError(f"image {index}: {image.size[0]}x{image.size[1]} pixels, more than {MAX_SIDE} a side")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except WireError:
        raise
    except Exception:  # PIL raises many kinds for broken files
        raise WireError(f"image {index}: not a readable PNG") from None


def encode_reply(rewards: torch.Tensor, info: dict) -> dict:
    """Rewards ``[B]`` and per-image info as a JSON-ready reply (non-finite rewards as null)."""
    values = [float(r) if math.isfinite(float(r)) else None for r in rewards.detach().float().cpu().tolist()]
    return {"rewards": values, "info": {key: jsonable(value) for key, value in info.items()}}


def jsonable(value):
    if torch.is_tensor(value):
        value = value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None), dict)) else str(value)


def decode_reply(reply, n: int) -> tuple[list[float], dict]:
    """``(rewards, info)`` of a reply for ``n`` images (null rewards as NaN); WireError for anything else."""
    rewards = reply.get("rewards") if isinstance(reply, dict) else None
    if not isinstance(rewards, list) or len(rewards) != n or \
            not all(r is None or (isinstance(r, (int, float)) and not isinstance(r, bool)) for r in rewards):
        raise WireError(f"the reply holds no list of {n} rewards")
    info = reply.get("info", {})
    if not isinstance(info, dict):
        raise WireError("the reply's info is not an object")
    return [math.nan if r is None else float(r) for r in rewards], info
