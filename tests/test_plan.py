"""`ddpo plan`: the memory formula by hand; activations measured on the meta device equal a real forward's; the real
models' parameter counts from their shipped configs, against the model cards; the command end to end."""
import pytest
import torch

from conftest import ddpo
from ddpo_cli.config import compose
from ddpo_cli.memory import MemoryInputs, cache_bytes, memory_terms
from ddpo_cli.models import load_model, resolve_model_path
from ddpo_cli.models.meta import meta_model, training_activations


def test_the_memory_formula_by_hand():
    m = MemoryInputs(frozen_denoiser=1000, trainable=10, encoders_and_vae=100, reward=5, buffer_bytes=6,
                     weight_bytes=2, weight_shards=2, state_shards=2, master_copy=False, largest_block=50,
                     activation_bytes=64, cache_bytes=8)
    assert memory_terms(m) == {"frozen weights": 1000 * 2 / 2 + 100 * 2 + 5 * 4 + 6, "trainable weights": 20,
                               "master copy": 0, "weight copies": 0, "gradients": 20, "optimizer state": 40,
                               "gathered block": 100,
                               "activations": 64, "conditioning cache": 8,
                               "total": 1226 + 20 + 20 + 40 + 100 + 64 + 8}
    unsharded = memory_terms(MemoryInputs(1000, 10, 100, 5, 6, 2, 1, 1, False, 50, 64, 8, weight_copies=2))
    assert unsharded["gathered block"] == 0 and unsharded["optimizer state"] == 80
    assert unsharded["weight copies"] == 2 * 10 * 4       # the old policy and the reference, fp32, whole
    zero2 = memory_terms(MemoryInputs(1000, 10, 100, 5, 6, 2, 1, 2, True, 50, 64, 8))  # weights whole, state split
    assert (zero2["frozen weights"], zero2["trainable weights"], zero2["master copy"], zero2["gradients"],
            zero2["optimizer state"], zero2["gathered block"]) == (1000 * 2 + 226, 40, 20, 20, 40, 0)
    assert cache_bytes(prompts=9, bytes_per_prompt=2 ** 20, bound_mb=None) == 10 * 2 ** 20  # + the empty prompt
    assert cache_bytes(prompts=9, bytes_per_prompt=2 ** 20, bound_mb=4) == 4 * 2 ** 20


def saved_bytes_of_a_real_forward(model, pairs: int, guidance: float) -> int:
    """The same count on the CPU, with the CPU's own attention kernel (no stand-in)."""
    weights = {t.untyped_storage()._cdata for t in [*model.denoiser.parameters(), *model.denoiser.buffers()]}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage()._cdata not in weights:
            saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    model.denoiser.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.predict(model.denoiser, torch.zeros(pairs, *model.latent_shape()), torch.full((pairs,), 500.0),
                      model.example_conditioning(pairs), model.example_conditioning(1), guidance)
    return sum(saved.values())


@pytest.mark.parametrize("overrides", [["model=tiny"], ["model=tiny", "model.gradient_checkpointing=true"],
                                       ["model=tiny_sd3", "sampler=flow_sde"], ["model=tiny_flux", "sampler=flow_sde"],
                                       ["model=tiny_sdxl", "model.use_lora=false"]], ids=lambda o: " ".join(o))
def test_activations_measured_on_the_meta_device_equal_a_real_forward(overrides, cache_dir):
    cfg = compose("train", overrides)
    meta = meta_model(cfg.model, torch.float32, resolve_model_path(cfg.model))
    real = load_model(cfg.model, torch.device("cpu"), torch.float32, lora_seed=0)
    assert {k: tuple(v.shape[1:]) for k, v in vars(real.encode(["a red cat"])).items() if v is not None} == \
        meta.conditioning_shapes()
    planned, items = training_activations(meta, 4, 5.0)
    assert planned == saved_bytes_of_a_real_forward(real, 4, 5.0) > 0
    assert items == (4 if cfg.model.family == "flux" else 8)  # CFG doubles the batch; FLUX-dev takes the scale


# parameters per component built from the shipped configs; the model cards' figures beside them
REAL = {
    "sd15": {"unet": (859_520_964, 860e6), "text_encoder": (123_060_480, 123e6), "vae": (83_653_863, 84e6)},
    "sdxl": {"unet": (2_567_463_684, 2.6e9), "text_encoder": (123_060_480, 123e6),
             "text_encoder_2": (694_659_840, 695e6)},
    "sd35_medium": {"transformer": (2_243_171_520, 2.5e9), "text_encoder_3": (4_762_310_656, 4.7e9),
                    "text_encoder_2": (694_659_840, 695e6)},
    "flux_dev": {"transformer": (11_901_408_320, 12e9), "text_encoder_2": (4_762_310_656, 4.7e9),
                 "text_encoder": (123_060_480, 123e6)},
}


@pytest.mark.parametrize("name", REAL)
def test_the_real_models_are_sized_from_their_configs(name):
    overrides = [f"model={name}", "model.use_lora=false"] + (["sampler=flow_sde"] if "sd3" in name or "flux" in name
                                                             else [])
    cfg = compose("train", overrides)
    model = meta_model(cfg.model, torch.bfloat16, resolve_model_path(cfg.model))
    for component, (exact, published) in REAL[name].items():
        count = sum(p.numel() for p in getattr(model.pipe, component).parameters())
        assert count == exact
        # the cards round; SD3.5 Medium's card says 2.5 B where its transformer's config builds 2.24 B
        assert abs(count / published - 1) < (0.11 if name == "sd35_medium" and component == "transformer" else 0.03)


def test_ddpo_plan_prints_the_memory_of_a_run_and_refuses_bad_options(cache_dir):
    result = ddpo("plan", "model=tiny", "--gpus", "2", "--strategy", "fsdp2")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    words = " ".join(out.replace("│", " ").split())
    assert "optimizer state" in words and "gathered block" in words and "2 GPUs, fsdp2" in words
    bad = ddpo("plan", "model=tiny", "--strategy", "zero1")
    assert bad.returncode == 2 and "--strategy zero1: choose ddp, fsdp2, zero2, zero3" in bad.stderr


@pytest.mark.parametrize("overrides,copies", [
    (["algo=dpo"], 0), (["algo=dpo", "model.use_lora=false"], 1), (["algo=nft"], 1),
    (["algo=nft", "algo.kl_beta=0.1", "model.use_lora=false"], 2), (["algo=ddpo_is", "model.use_lora=false"], 0)])
def test_the_plan_counts_the_copies_of_the_trained_weights_a_run_keeps(overrides, copies):
    from ddpo_cli.config import compose, plan_run
    from ddpo_cli.errors import UserError
    from ddpo_cli.planner import weight_copies

    cfg = compose("train", ["model=tiny", "sampler.batch_size=2", "sampler.group_size=2",
                            "train.batch_size=2", *overrides])
    run_plan = plan_run(cfg)
    assert weight_copies(cfg, run_plan, "ddp") == weight_copies(cfg, run_plan, "zero2") == copies
    if copies:
        with pytest.raises(UserError, match="does not shard yet"):
            weight_copies(cfg, run_plan, "fsdp2")


def test_reward_models_are_sized_without_loading_them():
    from ddpo_cli.config import build

    def sized(option: str):
        return build(compose("train", [f"reward={option}"]).reward, "reward").model_parameters()

    # open_clip ViT-L/14 (OpenAI: 428 M) and the LAION MLP on its 768-dim embeddings (927,969)
    assert sized("clip_score") == 427_616_513 and sized("aesthetic") == 427_616_513 + 927_969
    assert sized("hpsv2") == 986_109_441  # open_clip ViT-H/14
    assert sized("jpeg_compressibility") == 0 and sized("remote") == 0  # no model here
    assert sized("pickscore") is None  # a transformers model: its config is on the hub
