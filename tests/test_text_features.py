"""The bounded text-feature cache: each text encoded alone and once while cached, the least recently used dropped
past the bound, and a dropped text encoded again to exactly its old features."""
import pytest
import torch

from ddpo_cli.config import compose
from ddpo_cli.config.checks import check_model
from ddpo_cli.errors import UserError
from ddpo_cli.models.conditioning import Conditioning
from ddpo_cli.text_features import TextFeatureCache, nbytes


def encoder():
    calls = []

    def encode(texts):
        assert len(texts) == 1  # alone, so the features never depend on a batch
        calls.append(texts[0])
        seed = sum(map(ord, texts[0]))
        return Conditioning(torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed)), torch.zeros(1, 2))

    return encode, calls


def test_nbytes_counts_every_tensor_of_a_conditioning():
    assert nbytes(Conditioning(torch.zeros(2, 3, 4), torch.zeros(2, 5, dtype=torch.float16))) == 2 * 12 * 4 + 10 * 2
    assert nbytes([torch.zeros(3), {"a": torch.zeros(2, dtype=torch.int64)}]) == 12 + 16


def test_the_bound_drops_the_least_recently_used_and_reencodes_identically():
    encode, calls = encoder()
    one = nbytes(encode(["x"]))  # 4*8*4 + 2*4 = 136 bytes per text
    calls.clear()
    cache = TextFeatureCache(encode, max_bytes=2 * one)
    first = cache(["a", "b", "a"])
    assert calls == ["a", "b"] and cache.cached_bytes == 2 * one
    cache(["a"])             # a is now the most recent
    cache(["c"])             # over the bound: b, the least recently used, goes
    assert list(cache.features) == ["a", "c"] and calls == ["a", "b", "c"]
    again = cache(["b"])[0]  # encoded again, to the same features bit for bit
    assert calls[-1] == "b" and torch.equal(again.embeds, first[1].embeds)
    big = cache(["d", "e", "f"])  # one call's texts stay until it returns, even past the bound
    assert len(big) == 3 and cache.cached_bytes == 3 * one
    assert cache.encodings == 7  # a, b, c, b again, d, e, f
    unbounded = TextFeatureCache(encode)
    unbounded(["p", "q", "r"])
    assert list(unbounded.features) == ["p", "q", "r"]


def test_the_bound_is_a_checked_model_setting():
    assert compose("train", ["model=tiny"]).model.text_cache_mb == 1024
    check_model(compose("train", ["model=tiny", "model.text_cache_mb=null"]).model)
    with pytest.raises(UserError, match="model.text_cache_mb=-1"):
        check_model(compose("train", ["model=tiny", "model.text_cache_mb=-1"]).model)
