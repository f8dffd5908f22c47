"""The contracts of the two seams, checked on every implementation: model families (ddpo_cli/models) and samplers
(ddpo_cli/samplers). A new family or sampler joins the parametrisations below."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import load_lora_plainly
from ddpo_cli.config import compose
from ddpo_cli.models import Conditioning, absent_components, load_model
from ddpo_cli.models.tiny import SCHEDULER_CONFIG
from ddpo_cli.samplers import SAMPLERS, build_sampler
from ddpo_cli.samplers.ddim import DDIMSampler
from ddpo_cli.samplers.gaussian import gaussian_log_prob


# ----------------------------------------------------------------------------------------------- conditioning
def test_conditioning_indexes_expands_and_concatenates_like_a_tensor():
    cond = Conditioning(torch.arange(24.0).reshape(2, 3, 4), torch.ones(2, 5), torch.zeros(2, 6))
    assert len(cond) == 2 and len(cond[1:]) == 1 and cond[[1, 1, 0]].pooled.shape == (3, 5)
    assert torch.equal(cond[1].embeds, cond.embeds[1])
    one = cond[:1].expand(4)
    assert one.embeds.shape == (4, 3, 4) and one.ids.shape == (4, 6) and torch.equal(one.embeds[3], cond.embeds[0])
    both = Conditioning.cat([cond, cond[:1]])
    assert both.embeds.shape == (3, 3, 4) and both.pooled.shape == (3, 5)
    plain = Conditioning(torch.zeros(2, 3, 4))
    assert plain[0:1].pooled is None and plain.to(torch.float64).embeds.dtype == torch.float64


# ----------------------------------------------------------------------------------------------- samplers
def check_sampler_contract(sampler, shape=(3, 4, 8, 8)):
    """What every sampler promises: step indices map to the denoiser's times, stochastic steps are fp32 Gaussians
    with std > 0 whose draws score their own log-prob, and the forward process keeps shapes."""
    gen = torch.Generator().manual_seed(0)
    assert sampler.timesteps.shape == (sampler.num_steps,)
    steps = torch.tensor([0, sampler.num_steps // 2, sampler.num_steps - 1])
    assert torch.equal(sampler.model_time(steps), sampler.timesteps[steps])
    x, out = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    for i in range(sampler.num_steps):
        step = torch.full((shape[0],), i)
        assert sampler.step(out, x, step).shape == shape
        if sampler.is_stochastic(i):
            mean, std = sampler.step_distribution(out, x, step)
            assert mean.shape == shape and mean.dtype == torch.float32 and bool((std > 0).all())
            draw = mean + std * torch.randn(shape, generator=gen)
            assert torch.isfinite(gaussian_log_prob(draw, mean, std)).all()
    t = sampler.training_times(shape[0], "cpu")
    noisy, target = sampler.noisy_and_target(x, out, t)
    assert noisy.shape == target.shape == shape


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_keeps_the_contract(name):
    cfg = compose("train", ["model=tiny", f"sampler={name}", "sampler.num_steps=6"])
    kind = SAMPLERS[name].model_kind
    schedule = SCHEDULER_CONFIG if kind == "diffusion" else {"num_train_timesteps": 1000, "shift": 3.0}
    model = type("Model", (), {"kind": kind, "family": "any", "scheduler_config": schedule,
                               "device": torch.device("cpu"),
                               "timestep_kwargs": staticmethod(lambda n: {"num_inference_steps": n})})()
    sampler = build_sampler(cfg.sampler, model)
    check_sampler_contract(sampler)
    assert [i for i in range(6) if sampler.is_stochastic(i)] == SAMPLERS[name].stochastic_steps(cfg.sampler)
    assert sampler.log_prob_form == cfg.sampler.log_prob == ("unscaled" if name == "flow_cps" else "exact")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_deterministic_step_and_forward_process_match_diffusers(prediction_type):
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction_type}
    sampler = DDIMSampler(config, 10, eta=0.0)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    assert not sampler.is_stochastic(0) and DDIMSampler(config, 10, eta=1.0).is_stochastic(0)
    for i, t in enumerate(scheduler.timesteps):
        out = torch.randn(2, 4, 8, 8, generator=gen)
        expected = scheduler.step(out, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(sampler.step(out, x, torch.full((2,), i)), expected, rtol=1e-5, atol=1e-6)
        # the stochastic step's mean tends to the deterministic step as eta -> 0
        mean, std = DDIMSampler(config, 10, eta=1e-4).step_distribution(out, x, torch.full((2,), i))
        torch.testing.assert_close(mean, sampler.step(out, x, torch.full((2,), i)), rtol=1e-4, atol=1e-5)
        x = expected
    ddpm = DDPMScheduler(**{k: v for k, v in config.items() if k != "set_alpha_to_one"})
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    noisy, target = sampler.noisy_and_target(x0, noise, t)
    torch.testing.assert_close(noisy, ddpm.add_noise(x0, noise, t))
    expected_target = noise if prediction_type == "epsilon" else ddpm.get_velocity(x0, noise, t)
    torch.testing.assert_close(target, expected_target)


def test_a_sampler_refuses_a_model_of_another_kind():
    from ddpo_cli.errors import UserError

    cfg = compose("train", ["model=tiny"])
    flow_model = type("Model", (), {"kind": "flow", "family": "sd3", "scheduler_config": {}, "device": "cpu"})()
    with pytest.raises(UserError, match="sampler=ddim is for diffusion models"):
        build_sampler(cfg.sampler, flow_model)


# ----------------------------------------------------------------------------------------------- model families
@pytest.fixture(scope="module", params=["tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux"])
def family(request, cache_dir):
    cfg = compose("train", [f"model={request.param}"])
    return cfg.model, load_model(cfg.model, torch.device("cpu"), torch.float32, lora_seed=0)


def test_every_family_keeps_the_contract(family):
    model_cfg, model = family
    c, h, w = model.latent_shape()
    packed = 4 if model_cfg.family == "flux" else 1  # FLUX's transformer sees 2x2 patches of the latents
    assert h * model.vae_scale_factor == model.resolution == 32 and c * packed == model.denoiser.config.in_channels
    assert model.kind == ("flow" if model_cfg.family in ("sd3", "flux") else "diffusion")
    cond = model.encode(["a cat", "a dog", "a cat"])
    assert len(cond) == 3 and torch.equal(cond[0].embeds, cond[2].embeds) and len(model.negative) == 1
    x = torch.randn(3, c, h, w, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 1])
    with torch.no_grad():
        guided = model.predict(model.denoiser, x, t, cond, model.negative, 5.0)
        cond_only = model.predict(model.denoiser, x, t, cond, model.negative, 1.0)
        uncond_only = model.predict(model.denoiser, x, t, model.negative.expand(3), model.negative, 1.0)
        images = model.decode(x)
    assert guided.shape == x.shape and guided.dtype == torch.float32
    if model_cfg.family == "flux":  # guidance-distilled: the scale is an input, the negative prompt takes no part
        with torch.no_grad():
            other = model.predict(model.denoiser, x, t, cond, model.encode(["anything"]), 5.0)
        assert torch.equal(guided, other) and not torch.equal(guided, cond_only)
    else:  # CFG as one batched call equals the two separate calls combined
        torch.testing.assert_close(guided, uncond_only + 5.0 * (cond_only - uncond_only), rtol=1e-4, atol=1e-5)
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    trainable = model.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(not p.requires_grad for p in model.vae.parameters())


def test_lora_round_trips_through_the_family_format(family, tmp_path):
    model_cfg, model = family
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    model.save_lora(model.denoiser, tmp_path)
    other = load_model(model_cfg, torch.device("cpu"), torch.float32, lora_seed=5)
    other.load_lora(other.denoiser, tmp_path)
    mine = dict(model.denoiser.named_parameters())
    assert all(torch.equal(p, mine[n]) for n, p in other.denoiser.named_parameters() if "lora" in n)
    # and plain diffusers reads the file with the family's own pipeline class
    # plain diffusers, as a user loads SD3 without its T5: the absent components named (text_encoder_3=None, ...)
    plain = model.pipeline_class.from_pretrained(
        model.pipe.name_or_path, **{**absent_components(Path(model.pipe.name_or_path)), **model.load_kwargs})
    load_lora_plainly(plain, tmp_path)
    # every adapted layer arrives (a file in mixed key formats once lost SD3's to_q/to_k/to_v/to_out silently)
    theirs = sorted(n.split(".lora_")[0] for n, _ in getattr(plain, model.denoiser_name).named_parameters()
                    if ".lora_A." in n)
    ours = sorted(n.split(".lora_")[0] for n, _ in model.denoiser.named_parameters() if ".lora_A." in n)
    assert theirs == ours and ours


def test_a_lora_with_alpha_other_than_rank_loads_at_its_strength_in_plain_diffusers(tmp_path, cache_dir):
    # the scale alpha / r travels in the file's header; a loader that ignored it would apply 1.0 instead of 2.0
    cfg = compose("train", ["model=tiny", "model.lora.rank=4", "model.lora.alpha=8"])
    model = load_model(cfg.model, torch.device("cpu"), torch.float32, lora_seed=0)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    model.save_lora(model.denoiser, tmp_path)
    plain = model.pipeline_class.from_pretrained(model.pipe.name_or_path, **model.load_kwargs)
    load_lora_plainly(plain, tmp_path)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    ours, theirs = model.denoiser.get_submodule(name), plain.unet.get_submodule(name)
    (adapter,) = theirs.lora_A.keys()
    torch.testing.assert_close(theirs.get_delta_weight(adapter), ours.get_delta_weight("default"))
    assert ours.scaling["default"] == 2.0
    # the header holds only settings every supported peft's LoraConfig accepts (a newer peft's full config does not)
    import json

    from safetensors import safe_open

    from ddpo_cli.models.base import PORTABLE_LORA_FIELDS

    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as handle:
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert {key.removeprefix("unet.") for key in header} <= set(PORTABLE_LORA_FIELDS) and header["unet.r"] == 4


def test_sdxl_conditioning_matches_diffusers_encode_prompt(cache_dir):
    cfg = compose("train", ["model=tiny_sdxl"])
    model = load_model(cfg.model, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = model.pipe.encode_prompt(["a cat", "a dog"], device="cpu",
                                                                              do_classifier_free_guidance=True)
    cond = model.encode(["a cat", "a dog"])
    torch.testing.assert_close(cond.embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    torch.testing.assert_close(model.negative.embeds.expand_as(negative), negative)  # zeros (force_zeros)
    torch.testing.assert_close(model.negative.pooled.expand_as(negative_pooled), negative_pooled)
    assert cond.ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2


def test_decode_undoes_the_vaes_scaling_and_shift():
    from types import SimpleNamespace

    from ddpo_cli.models import ModelFamily

    class IdentityVAE:  # decode(z) = z, so the image shows what the VAE was given
        dtype = torch.float32

        def __init__(self, **config):
            self.config = SimpleNamespace(**{"scaling_factor": 2.0, "shift_factor": None, "latents_mean": None,
                                             "latents_std": None, **config})

        def decode(self, z):
            return SimpleNamespace(sample=z)

    model = ModelFamily.__new__(ModelFamily)
    z = torch.tensor([-1.0, 0.0, 0.8]).reshape(1, 3, 1, 1)
    # VAE input z / 2 (+ shift), image = input / 2 + 0.5 clamped to [0, 1]
    model.pipe = SimpleNamespace(vae=IdentityVAE())                          # SD: no shift
    assert model.decode(z).flatten().tolist() == pytest.approx([0.25, 0.5, 0.7])
    model.pipe = SimpleNamespace(vae=IdentityVAE(shift_factor=0.5))          # SD3 / FLUX: + shift_factor
    assert model.decode(z).flatten().tolist() == pytest.approx([0.5, 0.75, 0.95])
    model.pipe = SimpleNamespace(vae=IdentityVAE(latents_mean=[0.0, 1.0, 0.0], latents_std=[1.0, 1.0, 0.5]))
    # per-channel statistics: z * std / 2 + mean -> [-0.5, 1.0, 0.2] -> images [0.25, 1.0, 0.6]
    assert model.decode(z).flatten().tolist() == pytest.approx([0.25, 1.0, 0.6])
