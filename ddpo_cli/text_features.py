"""The one cache of text features (prompt conditionings, reward text embeddings): each distinct text encoded once,
and the least recently used dropped when the cache outgrows its bound."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

import torch

Features = TypeVar("Features")


def nbytes(features) -> int:
    """Bytes of every tensor in ``features`` (a tensor, a dataclass of tensors, or lists / dicts of them)."""
    if torch.is_tensor(features):
        return features.numel() * features.element_size()
    if dataclasses.is_dataclass(features):
        return sum(nbytes(getattr(features, f.name)) for f in dataclasses.fields(features))
    if isinstance(features, (list, tuple)):
        return sum(nbytes(item) for item in features)
    if isinstance(features, dict):
        return sum(nbytes(item) for item in features.values())
    return 0


class TextFeatureCache(Generic[Features]):
    """``cache(texts) -> [features of each text]``, calling ``encode([text])`` once per distinct text, under
    ``torch.no_grad``. Texts are encoded alone: a text encoder's output depends on the batch it runs in by the last
    bits, so features cached from batches would depend on which texts first came together, and a resumed run would
    not redo the uninterrupted run's arithmetic. For the same reason a text dropped by the bound and encoded again
    gets exactly the features it had.

    ``max_bytes`` (None: no bound) bounds the cached tensors: with a T5 encoder one prompt's conditioning is a few MB
    on the GPU, so a set of thousands of prompts would otherwise hold gigabytes. The texts of the current call are
    always kept until it returns."""

    def __init__(self, encode: Callable[[list[str]], Features], max_bytes: int | None = None) -> None:
        self.encode, self.max_bytes = encode, max_bytes
        self.features: OrderedDict[str, Features] = OrderedDict()
        self.sizes: dict[str, int] = {}
        self.encodings = 0  # calls of ``encode`` so far (each one text)

    def __call__(self, texts: list[str]) -> list[Features]:
        wanted = list(dict.fromkeys(texts))
        found = {}
        for text in wanted:
            if text in self.features:
                self.features.move_to_end(text)
            else:
                with torch.no_grad():
                    self.features[text] = self.encode([text])
                self.sizes[text] = nbytes(self.features[text])
                self.encodings += 1
            found[text] = self.features[text]
        self.evict(keep=len(wanted))
        return [found[text] for text in texts]

    @property
    def cached_bytes(self) -> int:
        return sum(self.sizes.values())

    def evict(self, keep: int) -> None:
        """Drop the least recently used texts until the bound holds, never the ``keep`` most recent."""
        if self.max_bytes is None:
            return
        total = self.cached_bytes
        while total > self.max_bytes and len(self.features) > keep:
            text, _ = self.features.popitem(last=False)
            total -= self.sizes.pop(text)

    def clear(self) -> None:
        self.features.clear()
        self.sizes.clear()
