"""The one cache of text features (prompt conditionings, reward text embeddings): each distinct text encoded once."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch

Features = TypeVar("Features")


class TextFeatureCache(Generic[Features]):
    """``cache(texts) -> [features of each text]``, calling ``encode([text])`` once per distinct text, under
    ``torch.no_grad``. Texts are encoded alone: a text encoder's output depends on the batch it runs in by the last
    bits, so features cached from batches would depend on which texts first came together, and a resumed run would
    not redo the uninterrupted run's arithmetic."""

    def __init__(self, encode: Callable[[list[str]], Features]) -> None:
        self.encode, self.features = encode, {}

    def __call__(self, texts: list[str]) -> list[Features]:
        for text in dict.fromkeys(texts):
            if text not in self.features:
                with torch.no_grad():
                    self.features[text] = self.encode([text])
        return [self.features[text] for text in texts]

    def clear(self) -> None:
        self.features = {}
