"""`ddpo doctor`: it passes on the tiny model of every family and on every algorithm, and each of its checks fails
on a configuration (or part) broken in the way that check watches for: a check that cannot fail is not a check."""
import pytest
import torch

from conftest import ddpo

FAST = ["sampler.num_steps=4", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1", "train.batch_size=2",
        "train.gradient_accumulation_steps=2", "train.timesteps_per_forward=4", "threads=2", "seed=3"]
CHECKS = ["config", "ratio at the first update", "log-prob vs batch size / chunking",
          "zero-noise limit = deterministic sampler", "KL to base: 0 at init, gradient after a change",
          "reward contract", "paired measure: base = policy at init", "gradients reach only trainable parameters",
          "save -> resume gives the same weights"]


def verdicts(result) -> dict[str, str]:
    """check name -> pass / FAIL / n/a, from the printed table (rows wrap: the name's first words are enough)."""
    found = {}
    for line in (result.stdout + result.stderr).splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 4 and cells[-2] in ("pass", "FAIL", "n/a"):
            found[cells[1]] = cells[-2]
    return {name: next(v for k, v in found.items() if name.startswith(k)) for name in CHECKS
            if any(name.startswith(k) for k in found if k)}


def doctor(*overrides: str):
    return ddpo("doctor", *FAST, *overrides, env={"COLUMNS": "200"})


@pytest.mark.parametrize("overrides", [
    ["model=tiny"], ["model=tiny_sdxl"], ["model=tiny_sd3", "sampler=flow_sde"], ["model=tiny_flux", "sampler=flow_sde"],
    ["model=tiny", "algo=ddpo_sf"], ["model=tiny", "algo=rwr"], ["model=tiny", "algo=rwr_sparse"],
    ["model=tiny", "algo=dpok"], ["model=tiny_sd3", "sampler=flow_sde", "algo=nft_chain"],
    ["model=tiny_sd3", "sampler=flow_ode", "algo=nft"], ["model=tiny", "algo=dpo", "sampler.group_size=2"],
    ["model=tiny", "algo=alignprop", "reward=custom", "sampler.eta=0"],
    ["model=tiny", "algo=draft", "reward=custom", "sampler.eta=0"], ["model=tiny", "algo=baseline"],
    ["model=tiny", "model.use_lora=false"],
])
def test_the_doctor_passes_on_every_family_and_algorithm(overrides, cache_dir):
    result = doctor(*overrides)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    found = verdicts(result)
    assert set(found) == set(CHECKS) and "FAIL" not in found.values(), found


FAMILIES = {"tiny": [], "tiny_sdxl": [], "tiny_sd3": ["sampler=flow_sde"], "tiny_flux": ["sampler=flow_sde"]}
ALGORITHMS = {"ddpo_is": [], "ddpo_sf": [], "rwr": [], "rwr_sparse": [], "dpok": [], "nft_chain": [], "baseline": [],
              "alignprop": ["reward=custom"], "draft": ["reward=custom"], "nft": [], "awm": [],
              "dpo": ["sampler.group_size=2"], "grpo_guard": [], "dppo": []}


@pytest.mark.matrix
@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_doctor_passes_on_every_family_x_algorithm(family, algo, cache_dir):
    """The whole cross product (CI's matrix step; the suite above runs each family and each algorithm once)."""
    backprop = ["sampler.eta=0"] if algo in ("alignprop", "draft") and family in ("tiny", "tiny_sdxl") else []
    result = doctor(f"model={family}", *FAMILIES[family], f"algo={algo}", *ALGORITHMS[algo], *backprop)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    found = verdicts(result)
    assert set(found) == set(CHECKS) and "FAIL" not in found.values(), found


def failed(result) -> set[str]:
    assert result.returncode == 1, (result.stdout + result.stderr)[-4000:]
    found = verdicts(result)
    assert "checks failed" in result.stderr or "check failed" in result.stderr
    return {name for name, verdict in found.items() if verdict == "FAIL"}


def test_a_sliding_window_that_leaves_the_trained_steps_fails_the_config_check(cache_dir):
    result = doctor("model=tiny", "sampler.num_steps=6", "sampler.sde_window=[0,2]", "sampler.sde_window_slide_every=1",
                    "train.timestep_window=[0.0,0.5]")
    assert failed(result) == {"config"}
    assert "holds none of the sampler's stochastic steps" in " ".join(result.stdout.split())


def test_a_sampler_whose_steps_draw_other_noise_fails_the_ratio_and_the_paired_measure(monkeypatch, cache_dir):
    from ddpo_cli.samplers.ddim import DDIMSampler

    real = DDIMSampler.step_distribution

    def noisy(self, output, x_t, steps):
        mean, std = real(self, output, x_t, steps)
        return mean + 1e-2 * torch.randn_like(mean), std   # torch's global generator: other noise every call

    monkeypatch.setattr(DDIMSampler, "step_distribution", noisy)
    found = failed(doctor("model=tiny"))
    assert {"ratio at the first update", "log-prob vs batch size / chunking", "paired measure: base = policy at init",
            "zero-noise limit = deterministic sampler"} <= found


def test_a_denoiser_whose_output_depends_on_the_batch_fails_the_log_prob_checks(monkeypatch, cache_dir):
    """What bf16 kernels chosen per batch size do on a GPU (on this CPU bf16 recomputes bit for bit)."""
    from ddpo_cli.models.base import ModelFamily

    real = ModelFamily.predict

    def batch_dependent(self, denoiser, x, t, cond, uncond, guidance):
        return real(self, denoiser, x, t, cond, uncond, guidance) * (1 + 1e-3 * x.shape[0])

    monkeypatch.setattr(ModelFamily, "predict", batch_dependent)
    assert {"ratio at the first update", "log-prob vs batch size / chunking"} <= failed(doctor("model=tiny"))


def test_a_zero_noise_step_off_the_deterministic_one_fails_the_limit_check(monkeypatch, cache_dir):
    from ddpo_cli.samplers.flow import FlowSampler

    real = FlowSampler.step_distribution

    def drifting(self, output, x_t, steps):
        mean, std = real(self, output, x_t, steps)
        return mean + 1e-2 * output.float(), std             # a wrong drift term, the same at every call

    monkeypatch.setattr(FlowSampler, "step_distribution", drifting)
    assert failed(doctor("model=tiny_sd3", "sampler=flow_sde")) == {"zero-noise limit = deterministic sampler"}


def test_a_base_model_that_is_the_policy_fails_the_kl_check(monkeypatch, cache_dir):
    from contextlib import contextmanager

    import ddpo_cli.doctor
    import ddpo_cli.reference

    @contextmanager
    def adapter_left_on(denoiser):
        yield denoiser

    monkeypatch.setattr(ddpo_cli.reference, "adapters_disabled", adapter_left_on)
    monkeypatch.setattr(ddpo_cli.doctor, "adapters_disabled", adapter_left_on)
    assert "KL to base: 0 at init, gradient after a change" in failed(doctor("model=tiny"))


@pytest.mark.parametrize("overrides,message", [
    (["reward=custom", "reward.fn.path=helpers.broken_parts.nan_reward", "reward.name=half_nan"],
     "2 of 4 rewards are NaN/inf"),
    (["reward._target_=helpers.broken_parts.Expects255"], "it expects images in [0.0, 255.0] and is given [0, 1]"),
    (["algo=alignprop", "reward=custom", "reward.fn.path=helpers.broken_parts.detached_brightness", "sampler.eta=0"],
     "its rewards carry no gradient to the images"),
])
def test_a_reward_that_breaks_its_contract_fails_it(overrides, message, cache_dir):
    result = doctor("model=tiny", *overrides)
    assert "reward contract" in failed(result)
    assert message in " ".join(result.stdout.replace("│", " ").split())


def test_gradients_outside_the_optimizer_fail_the_gradient_check(monkeypatch, cache_dir):
    from ddpo_cli.models.base import ModelFamily

    real = ModelFamily.trainable_parameters
    monkeypatch.setattr(ModelFamily, "trainable_parameters", lambda self: real(self)[::2])  # half left out
    assert "gradients reach only trainable parameters" in failed(doctor("model=tiny"))


def test_a_checkpoint_that_does_not_read_back_fails_the_round_trip(monkeypatch, cache_dir):
    from ddpo_cli.models.base import ModelFamily

    real = ModelFamily.save_lora

    def lossy(self, denoiser, folder, weights=None):
        weights = {k: v.half().float() for k, v in (weights or {}).items()} or None  # saved in half precision
        return real(self, denoiser, folder, weights)

    monkeypatch.setattr(ModelFamily, "save_lora", lossy)
    assert failed(doctor("model=tiny")) == {"save -> resume gives the same weights"}
