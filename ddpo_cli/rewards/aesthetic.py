"""LAION aesthetic predictor v2 (the DDPO paper's aesthetic reward, about 1-10).

CLIP ViT-L/14 image embedding, L2-normalised, then an MLP 768-1024-128-64-16-1 with dropout and no activations
(``sac+logos+ava1-l14-linearMSE.pth``; TRL mirrors it as ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``).

Two image paths: ``preprocess=torch`` (default; resize/crop/normalise in torch, differentiable, for AlignProp) and
``preprocess=pil`` (open_clip's own PIL transform on uint8 images, as the DDPO reference scorer; not differentiable).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..images import to_uint8_hwc
from ..errors import UserError, brief, loading
from .base import Reward
from .clip import clip_pixels, load_open_clip, open_clip_parameters, preprocess_cfg


class AestheticMLP(nn.Module):
    """768-1024-128-64-16-1, dropout .2/.2/.1, no activations (state-dict keys ``layers.{0,2,4,6,7}.*``)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)  # [B,768] -> [B,1]


def load_state_dict(path: str | Path, option: str = "weights_path") -> dict:
    """A ``.safetensors`` or ``.pth``/``.pt`` state dict (``torch.load(weights_only=True)``: no pickled code).
    UserError naming ``reward.<option>`` and the file when it is not one (damaged, empty, another format, a list, or
    a pickle that would run code)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, garbage, empty, or refused by weights_only
        raise UserError(f"reward.{option}: {path} is not a readable weights file ({brief(error, 160)}): give the "
                        f"reward's published weights (a .pth/.pt state dict or .safetensors)") from None
    if not isinstance(state, dict):
        raise UserError(f"reward.{option}: {path} holds a {type(state).__name__}, not a state dict: give the "
                        f"reward's published weights")
    return state


def local_or_hub_file(path: str | None, repo: str, filename: str, option: str, what: str) -> str:
    """Local path of a weights file: ``path`` if given (it must exist), else ``filename`` from the hub repo ``repo``
    (downloaded once, then cached). ``option`` is the reward key a user sets instead; ``what`` describes the file."""
    if path:
        if not Path(path).expanduser().is_file():
            raise UserError(f"reward.{option}={path!r} does not exist: give {what}")
        return str(Path(path).expanduser())
    from huggingface_hub import hf_hub_download

    with loading(f"{filename!r} from the hub repo {repo!r}", f"download it once with network access or set "
                                                             f"reward.{option}=<local file>"):
        return hf_hub_download(repo, filename)


class Aesthetic(Reward):
    """LAION aesthetic v2 score of each image (higher = prettier; SD v1.4 animals start near 5.5).

    ``weights_path`` (a local ``.pth``/``.safetensors``) wins over ``weights_repo``/``weights_file`` (downloaded
    from the Hugging Face hub once). The CLIP model is an open_clip name + ``pretrained`` tag or local file.
    """

    name = "aesthetic"
    output_range = (None, None)  # LAION predictor: ~1-10, most photos 4-7

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai",
                 weights_path: str | None = None, weights_repo: str = "trl-lib/ddpo-aesthetic-predictor",
                 weights_file: str = "aesthetic-model.pth", preprocess: str = "torch") -> None:
        super().__init__()
        if preprocess not in ("torch", "pil"):
            raise UserError(f"reward.preprocess={preprocess!r}: choose torch (differentiable) or pil")
        self.model_name, self.pretrained = model_name, pretrained
        self.weights_path, self.weights_repo, self.weights_file = weights_path, weights_repo, weights_file
        self.preprocess = preprocess
        self.differentiable = preprocess == "torch"

    def weights(self) -> str:
        """Local path of the MLP weights (downloading them from the hub if no ``weights_path`` is given)."""
        return local_or_hub_file(self.weights_path, self.weights_repo, self.weights_file, "weights_path",
                                 "the aesthetic MLP weights file (sac+logos+ava1-l14-linearMSE.pth or a .safetensors "
                                 "copy)")

    def load(self) -> None:
        path = self.weights()
        state = load_state_dict(path)  # before the slow CLIP build: a bad file fails at once
        try:
            self.mlp = AestheticMLP(input_dim=state["layers.0.weight"].shape[1])  # 768 for ViT-L/14
            self.mlp.load_state_dict(state)
        except (KeyError, AttributeError, IndexError, RuntimeError) as error:
            raise UserError(f"reward.weights_path: {path} is not the LAION aesthetic MLP ({brief(error, 160)}): give "
                            f"sac+logos+ava1-l14-linearMSE.pth or its .safetensors copy") from None
        self.clip, self.pil_preprocess, _ = load_open_clip(self.model_name, self.pretrained, self.device, self.dtype)
        self.cfg = preprocess_cfg(self.clip)
        self.mlp = self.mlp.to(self.device).eval().requires_grad_(False)  # float32: tiny, and keeps scores exact

    def model_parameters(self) -> int | None:
        """CLIP and the MLP on ViT-L/14's 768-dim embeddings (the LAION predictor's)."""
        clip = open_clip_parameters(self.model_name)
        with torch.device("meta"):
            mlp = sum(p.numel() for p in AestheticMLP(input_dim=768).parameters())
        return None if clip is None else clip + mlp

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B,3,224,224]`` CLIP input, by the configured path."""
        if self.preprocess == "torch":
            return clip_pixels(images.to(self.device, torch.float32), self.cfg)
        pil_images = [Image.fromarray(array) for array in to_uint8_hwc(images)]
        return torch.stack([self.pil_preprocess(image) for image in pil_images]).to(self.device)

    def score(self, images, prompts, metadata):
        embedding = self.clip.encode_image(self.pixels(images).to(self.dtype)).float()  # [B,768]
        embedding = F.normalize(embedding, dim=-1)
        scores = self.mlp(embedding).squeeze(-1)  # [B]
        return scores.to(images.device), {"aesthetic": scores.detach().tolist()}
