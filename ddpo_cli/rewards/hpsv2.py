"""HPS v2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H/14 fine-tuned on HPD v2 preferences.

Score = ``cos(image embedding, text embedding)`` (``diag(image_features @ text_features.T)`` with L2-normalised
features, as the public scorer: no logit scale). Real images score about 0.20-0.35; benchmarks quote x100
(SD 1.4: about 25 on v2.1). v2.0 and v2.1 scores are not comparable.

The architecture is open_clip's ``ViT-H-14`` (built without its LAION weights); the weights are the HPS checkpoint
``HPS_v2.1_compressed.pt`` of the hub repo ``xswu/HPSv2`` (a ``{"state_dict": ...}`` file), or a local file.
Preprocessing is clip.py's torch path (resize, centre crop, CLIP mean/std): differentiable.
"""
from __future__ import annotations

from ..errors import UserError, brief
from .aesthetic import load_state_dict, local_or_hub_file
from .clip import _OpenClipReward


class HPSv2(_OpenClipReward):
    """HPS v2.1 of each image for its prompt: a cosine in [-1, 1], about 0.20-0.35 for real images. Differentiable.

    ``model_name``: the open_clip architecture (``ViT-H-14``, or ``local-dir:/folder`` with an open_clip config).
    ``weights_path`` (a local checkpoint) wins over ``weights_repo``/``weights_file`` (downloaded once).
    """

    name = "hpsv2"
    differentiable = True
    output_range = (-1.0, 1.0)  # a cosine

    def __init__(self, model_name: str = "ViT-H-14", weights_path: str | None = None,
                 weights_repo: str = "xswu/HPSv2", weights_file: str = "HPS_v2.1_compressed.pt") -> None:
        super().__init__(model_name, pretrained=None, template="{prompt}")
        self.weights_path, self.weights_repo, self.weights_file = weights_path, weights_repo, weights_file

    def load(self) -> None:
        path = local_or_hub_file(self.weights_path, self.weights_repo, self.weights_file, "weights_path",
                                 "the HPS checkpoint (HPS_v2.1_compressed.pt)")  # before the slow model build
        checkpoint = load_state_dict(path)
        state = checkpoint.get("state_dict", checkpoint)  # the HPS file nests it; a .safetensors copy cannot
        if not isinstance(state, dict):
            raise UserError(f"reward.weights_path: {path} holds a {type(state).__name__} as its state_dict: give "
                            f"the HPS checkpoint (HPS_v2.1_compressed.pt)")
        super().load()  # the architecture only: open_clip logs that its weights are random; the HPS ones follow
        try:
            self.model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as error:
            raise UserError(f"reward.weights_path: the HPS checkpoint {path!r} does not fit the open_clip model {self.model_name!r} "
                            f"({brief(error)}): HPS v2/v2.1 need reward.model_name=ViT-H-14") from error

    def score(self, images, prompts, metadata):
        cosine = (self.image_features(images) * self.text_features(prompts)).sum(-1)  # [B]
        return cosine.to(images.device), {"hps": cosine.detach().tolist()}
