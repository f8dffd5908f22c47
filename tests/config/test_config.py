"""Every config option composes and validates; typed errors; derived counts."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ddpo_cli.cli import sweep_jobs
from ddpo_cli.config import compose, conf_dir, config_groups, derive_counts, validate
from ddpo_cli.errors import UserError

CONF = conf_dir()
GROUP_OPTIONS = [(group, option.stem) for group in config_groups() if group != "experiment"
                 for option in sorted((CONF / group).rglob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").rglob("*.yaml"))
DATA = Path(__file__).resolve().parents[1] / "data"
NEEDS = {("prompts", "from_file"): ["prompts.path=simple_animals.txt"], ("prompts", "from_list"): ["prompts.prompts=[a cat]"],
         ("prompts", "geneval"): [f"prompts.path={DATA / 'geneval_sample.jsonl'}"],
         ("prompts", "drawbench"): [f"prompts.path={DATA / 'drawbench_sample.csv'}"],
         ("algo", "alignprop"): ["reward=clip_score"], ("algo", "draft"): ["reward=clip_score"],
         ("algo", "dpo"): ["sampler.group_size=2", "sampler.batch_size=2"],
         ("algo", "dpo_offline"): [f"algo.pairs_file={DATA / 'toy_pairs' / 'pairs.jsonl'}"],
         **{("sampler", name): ["model=tiny_sd3"] for name in ("flow_sde", "dance_sde", "flow_cps")},
         ("sampler", "flow_ode"): ["model=tiny_sd3", "algo=draft", "reward=clip_score"],
         **{("model", name): ["sampler=flow_sde"] for name in ("sd3", "sd35_medium", "tiny_sd3", "flux_dev",
                                                              "flux_schnell", "tiny_flux", "tiny_shapes_flow")}}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose("train", [f"{group}={option}", *NEEDS.get((group, option), [])])
    validate(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose("train", [f"experiment={experiment}"])
    validate(cfg)
    assert OmegaConf.select(cfg, "train.num_epochs") >= 1


def test_paper_recipe_counts():
    cfg = compose("train", ["experiment=paper_compressibility"])
    counts = derive_counts(cfg, num_processes=8)
    assert (counts.samples_per_epoch, counts.updates_per_epoch, counts.train_timesteps) == (256, 4, 50)
    assert cfg.model.pretrained == "CompVis/stable-diffusion-v1-4"
    aesthetic = derive_counts(compose("train", ["experiment=paper_aesthetic"]), num_processes=8)
    assert (aesthetic.samples_per_epoch, aesthetic.updates_per_epoch) == (256, 2)
    alignment = derive_counts(compose("train", ["experiment=paper_alignment"]), num_processes=6)
    assert (alignment.samples_per_epoch, alignment.updates_per_epoch) == (288, 2)


@pytest.mark.parametrize("window,fraction,expected", [
    ([0.0, 1.0], 1.0, ((0, 10), 10)),
    ([0.0, 0.3], 1.0, ((0, 3), 3)),     # the first three (noisiest) of ten steps
    ([0.0, 0.3], 0.5, ((0, 3), 2)),     # half of the window, rounded
    ([0.5, 1.0], 0.2, ((5, 10), 1)),
    ([0.0, 0.01], 1.0, ((0, 1), 1)),    # never empty
])
def test_timestep_window_counts(window, fraction, expected):
    cfg = compose("train", ["sampler.num_steps=10", f"train.timestep_window=[{window[0]},{window[1]}]",
                            f"train.timestep_fraction={fraction}"])
    counts = derive_counts(cfg)
    assert (counts.window, counts.train_timesteps) == expected


def test_experiment_overrides_are_not_lost():
    # `_self_` comes before `experiment` in train.yaml, so the experiment's values win over the defaults
    cfg = compose("train", ["experiment=tiny_compressibility"])
    assert cfg.sampler.num_steps == 10 and cfg.advantage.mode == "batch"


@pytest.mark.parametrize("override,message", [
    ("train.foo=1", "Key 'foo' not in 'TrainConfig'"),
    ("train.lr=abc", "could not be converted to Float"),
    ("sampler.num_steps=1.5", "could not be converted to Integer"),
    ("reward=does_not_exist", "Could not find 'reward/does_not_exist'"),
])
def test_composition_errors_are_one_line(override, message):
    with pytest.raises(UserError, match=message) as info:
        compose("train", [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override,message", [
    ("sampler.eta=0", "sampler.eta"),
    ("sampler.eta=-1", "sampler.eta"),
    ("reward.qualtiy=3", "qualtiy"),
    ("reward.quality=high", "wrong type"),
    ("advantage.mode=group", "group_size"),
    ("train.timestep_fraction=0", "timestep_fraction"),
    ("train.timestep_window=[0.5,0.5]", "timestep_window"),
    ("train.timestep_window=[0,1.5]", "timestep_window"),
    ("train.timestep_window=[0.2]", "timestep_window"),
    ("precision=fp8", "precision"),
    ("algo=alignprop", "not differentiable"),
    ("algo=draft reward=clip_score algo.k=60", "algo.k=60"),
    ("algo=alignprop reward=clip_score algo.truncation=fixed", "keep_steps"),
    ("algo=alignprop reward=clip_score algo.truncation=sometimes", "truncation"),
    ("algo=dpok algo.kl_weighting=exact", "kl_weighting"),
])
def test_validation_errors(override, message):
    try:
        cfg = compose("train", override.split())
    except UserError as exc:  # some are caught at composition already
        assert message in str(exc) or "not in struct" in str(exc)
        return
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_batch_arithmetic_error_shows_the_sums():
    cfg = compose("train", ["sampler.batch_size=3", "sampler.num_batches_per_epoch=2", "train.batch_size=4"])
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert "3 x 2 = 6" in str(info.value) and "4 x 1 = 4" in str(info.value)


def test_sweep_expansion():
    jobs = sweep_jobs(["algo=ddpo_is,ddpo_sf", "seed=0,1,2"], multirun=True)
    assert len(jobs) == 6 and ["algo=ddpo_sf", "seed=2"] in jobs


def test_the_wheel_ships_every_package_and_conf():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    repo = Path(__file__).resolve().parents[2]
    setup = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.relative_to(repo).parts[:-1]) for p in (repo / "ddpo_cli").rglob("__init__.py")}
    assert packages <= set(setup["packages"]), f"not in pyproject's packages: {packages - set(setup['packages'])}"
    assert setup["package-dir"]["ddpo_cli.conf"] == "conf" and (CONF / "train.yaml").exists()
    assert "*/*.yaml" in setup["package-data"]["ddpo_cli.conf"]  # the config groups and conf/accelerate/


def test_a_sliding_window_must_keep_a_trained_step_at_every_position():
    # issue #23: checked at epoch 0 only, the window below left train.timestep_window at epoch 3, and epochs 3-8
    # trained nothing yet took optimizer steps (sampler.branch raised)
    base = ["model=tiny", "sampler.num_steps=10", "sampler.sde_window=[0,2]", "sampler.sde_window_slide_every=1"]
    with pytest.raises(UserError, match=r"holds none .* from epoch 3 on \(sampler.sde_window_slide_every=1\)"):
        validate(compose("train", [*base, "train.timestep_window=[0,0.3]"]))
    with pytest.raises(UserError, match="from epoch 6 on"):
        validate(compose("train", [*base, "sampler.sde_window_slide_every=2", "train.timestep_window=[0,0.3]"]))
    validate(compose("train", base))
    # antithetic pairs in groups of 2 train one step (a lone pair's baseline is exact there only)
    pairs = ["advantage.mode=group", "sampler.group_size=2", "sampler.batch_size=2", "sampler.antithetic=true"]
    with pytest.raises(UserError, match="sampler.group_size >= 4"):
        validate(compose("train", [*base, *pairs]))
    validate(compose("train", [*base, *pairs, "sampler.sde_window=[0,1]"]))
    validate(compose("train", [*base, *pairs, "sampler.group_size=4", "sampler.batch_size=4"]))
