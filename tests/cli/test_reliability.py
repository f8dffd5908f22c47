"""Nothing lost, nothing silently wrong (issue #14): each case below failed before its fix.

Every user mistake ends in one line on stderr and exit code 2, with nothing on disk changed; a run that would go on
silently wrong (NaN rewards, gradients or weights) stops; run folders are locked, never overwritten, and opened
without running code they name.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, ddpo, run_cli
from ddpo_cli.report import read_metrics

pytestmark = pytest.mark.slow
FAST = ["model=tiny", "monitor.every=0",
        "sampler.num_steps=3", "sampler.batch_size=4", "sampler.num_batches_per_epoch=1",
        "train.batch_size=4", "advantage.mode=batch", "log.tracker=none", "log.grid_images=4", "threads=1",
        "train.lr=1e-3", "prompts=from_list", "prompts.prompts=[a cat,a dog]"]
REWARDS = '''
import os
import time
from pathlib import Path

import torch


def nan_for_cats(images, prompts, metadata):
    values = images.mean(dim=(1, 2, 3))
    cats = torch.tensor(["cat" in p for p in prompts], device=values.device)
    return torch.where(cats, torch.full_like(values, float("nan")), values)


def all_nan(images, prompts, metadata):
    return torch.full((len(prompts),), float("nan"))


def scalar(images, prompts, metadata):
    return 1.0


def strings(images, prompts, metadata):
    return ["good"] * len(prompts)


def nothing(images, prompts, metadata):
    return None


def one_short(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))[:-1]


def raises(images, prompts, metadata):
    return {}["a key the reward forgot"]



def slow(images, prompts, metadata):
    Path(os.environ["SLOW_REWARD_STARTED"]).touch()  # tells the test the call is in flight
    time.sleep(120)
    return images.mean(dim=(1, 2, 3))


def prompts_of_mine():
    from ddpo_cli.prompts import PromptSet
    return PromptSet([("a cat", {})], name="mine")
'''


def custom(fn: str) -> list[str]:
    return ["reward=custom", f"reward.fn.path=bad_rewards.{fn}", f"reward.name={fn}"]


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("helpers")
    (folder / "bad_rewards.py").write_text(REWARDS)
    return {"PYTHONPATH": str(folder)}


def one_line_exit_2(result, *phrases, alone: bool = False) -> None:
    """Exit code 2, no traceback, and the last line of stderr is the one-line error holding ``phrases``; ``alone``:
    it is the only line (the run was refused before it started)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2500:]
    assert lines[-1].startswith("error:") and "Traceback" not in result.stderr, result.stderr[-2500:]
    assert len(lines) == 1 or not alone, result.stderr[-2500:]
    for phrase in phrases:
        assert phrase in lines[-1], (phrase, lines[-1])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".ddpo.lock"}


@pytest.fixture(scope="module")
def good_run(trained_run) -> Path:
    """The shared reference run: 2 epochs, a checkpoint after each (tests write into copies of it)."""
    return trained_run


def copy_of(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".ddpo.lock"))
    return target


# ----------------------------------------------------------------------------------------------- 1. non-finite values
def test_a_nan_reward_stops_the_run_and_keeps_every_checkpoint(good_run, tmp_path, helpers):
    run = copy_of(good_run, tmp_path)
    before = snapshot(run)
    result = ddpo("train", *FAST, *custom("nan_for_cats"), "train.num_epochs=4", f"resume={run}",
                     "resume_allow_changes=true", env=helpers)
    one_line_exit_2(result, "reward nan_for_cats", "non-finite", "'a cat'", "train.nonfinite_rewards=drop")
    after = snapshot(run)
    assert {k: v for k, v in after.items() if ".hydra" not in str(k)} == \
        {k: v for k, v in before.items() if ".hydra" not in str(k)}, "checkpoints and metrics stay as they were"


def test_dropping_nan_rewards_trains_on_the_others(tmp_path, helpers, cache_dir):
    run = tmp_path / "drop"
    result = ddpo("train", *FAST, *custom("nan_for_cats"), "train.nonfinite_rewards=drop", "train.num_epochs=2",
                 "advantage.mode=per_prompt", "advantage.min_count=1", f"hydra.run.dir={run}", env=helpers)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run)
    assert sum(r["nonfinite_rewards"] for r in rows) > 0 and all(r["reward_mean"] == r["reward_mean"] for r in rows)
    lora = load_file(run / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values())
    state = torch.load(run / "checkpoints" / "epoch_0001" / "training_state.pt", weights_only=True)
    buffers = state["stat_tracker"]["buffers"]
    assert "a cat" not in buffers and all(v == v for values in buffers.values() for v in values)
    everything_nan = ddpo("train", *FAST, *custom("all_nan"), "train.nonfinite_rewards=drop", "train.num_epochs=1",
                         f"hydra.run.dir={tmp_path / 'all_nan'}", env=helpers)
    one_line_exit_2(everything_nan, "no finite value")


def test_weights_with_nan_are_never_sampled(good_run, tmp_path):
    run = copy_of(good_run, tmp_path)
    lora_file = run / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors"
    weights = load_file(lora_file)
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, lora_file)
    one_line_exit_2(ddpo("sample", f"run={run}", "n=1", "num_prompts=1", f"hydra.run.dir={tmp_path / 's'}"),
                    "NaN/inf weights")


# ----------------------------------------------------------------------------------------------- 2. run folders
def test_a_run_folder_has_one_writer_and_is_never_overwritten(good_run, tmp_path):
    run = copy_of(good_run, tmp_path)
    before = snapshot(run)
    overwrite = ddpo("train", *FAST, "train.num_epochs=3", f"hydra.run.dir={run}")
    one_line_exit_2(overwrite, "already holds a run", f"resume={run}", alone=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ddpo_cli.runs import lock_run; "
                               "lock_run(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_exit_2(ddpo("train", *FAST, "train.num_epochs=3", f"resume={run}"),
                        "in use by another ddpo process", alone=True)
    finally:
        holder.kill()
    assert snapshot(run) == before


FLOW = ["model=tiny_shapes_flow", "monitor.every=0", "sampler=flow_sde", "sampler.num_steps=4", "sampler.batch_size=4",
        "sampler.num_batches_per_epoch=1", "train.batch_size=4", "advantage.mode=batch", "log.tracker=none",
        "log.grid_images=4", "threads=1", "train.lr=1e-3", "prompts=shapes_train", "train.num_epochs=3"]


def test_a_flow_run_killed_by_sigkill_resumes_to_the_uninterrupted_weights(tmp_path, cache_dir):
    # issue #23: kill -9 while the run trains or writes a checkpoint, and a second writer, for the flow family
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = subprocess.Popen([sys.executable, "-m", "ddpo_cli", "train", *FLOW, f"hydra.run.dir={whole}"],
                                     cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE,
                                     text=True)
    process = subprocess.Popen([sys.executable, "-m", "ddpo_cli", "train", *FLOW, f"hydra.run.dir={killed}"],
                               cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)

    def wait_for(*paths: Path) -> None:
        while process.poll() is None and not any(p.exists() for p in paths):
            time.sleep(0.002)

    checkpoints = killed / "checkpoints"
    wait_for(checkpoints / "epoch_0000")
    process.send_signal(signal.SIGSTOP)           # paused mid-run: a second writer must be refused
    one_line_exit_2(ddpo("train", *FLOW, f"resume={killed}"), "in use by another ddpo process", alone=True)
    process.send_signal(signal.SIGCONT)
    wait_for(checkpoints / ".epoch_0001.tmp", checkpoints / "epoch_0001")   # writing, or just written, epoch 1
    process.kill()
    assert process.wait() == -signal.SIGKILL
    from ddpo_cli.runs import list_checkpoints

    assert [p.name for p in list_checkpoints(killed)] in (["epoch_0000"], ["epoch_0000", "epoch_0001"])
    resumed = ddpo("train", *FLOW, f"resume={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    assert [r["epoch"] for r in read_metrics(killed)] == [0, 1, 2]
    last = Path("checkpoints") / "epoch_0002" / "pytorch_lora_weights.safetensors"
    resumed_lora, whole_lora = load_file(killed / last), load_file(whole / last)
    assert resumed_lora.keys() == whole_lora.keys()
    assert all(torch.equal(resumed_lora[key], whole_lora[key]) for key in whole_lora), "bit-identical weights"


def test_default_run_folders_are_new_for_every_process(tmp_path):
    from ddpo_cli.runs import fresh_folder

    base = tmp_path / "outputs" / "10-31-07_run"
    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(lambda _: fresh_folder(base), range(4)))
    assert sorted(p.name for p in made) == ["10-31-07_run", "10-31-07_run_2", "10-31-07_run_3", "10-31-07_run_4"]


# ----------------------------------------------------------------------------------------------- 3. a cut metrics line
def test_a_metrics_line_cut_by_a_full_disk_does_not_stop_resume_or_eval(good_run, tmp_path):
    run = copy_of(good_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "global_st')
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1]
    result = ddpo("train", *FAST, "train.num_epochs=3", f"resume={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- 4. untrusted runs
def test_a_run_folder_is_not_code(good_run, tmp_path, helpers):
    from omegaconf import OmegaConf

    def with_prompts(run: Path, node: dict) -> None:
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        config.prompts = node
        OmegaConf.save(config, run / ".hydra" / "config.yaml")

    run = copy_of(good_run, tmp_path)
    victim = tmp_path / "overwritten.txt"
    with_prompts(run, {"_target_": "shutil.copyfile", "src": str(run / "metrics.jsonl"), "dst": str(victim)})
    for command in ("sample", "eval"):
        one_line_exit_2(ddpo(command, f"run={run}", "n=1", "num_prompts=1", f"hydra.run.dir={tmp_path / command}"),
                        "outside ddpo_cli", "shutil.copyfile", "trust_run=true", alone=True)
    assert not victim.exists()
    # a run that names its owner's own code opens with trust_run=true
    own = copy_of(good_run, tmp_path, "own")
    with_prompts(own, {"_target_": "bad_rewards.prompts_of_mine"})
    refused = ddpo("sample", f"run={own}", "n=1", f"hydra.run.dir={tmp_path / 'refused'}", env=helpers)
    one_line_exit_2(refused, "bad_rewards.prompts_of_mine")
    trusted = ddpo("sample", f"run={own}", "n=1", "trust_run=true", f"hydra.run.dir={tmp_path / 'trusted'}",
                  env=helpers)
    assert trusted.returncode == 0, trusted.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- 5. checkpoints
def damage(run: Path, how: str) -> None:
    latest = run / "checkpoints" / "epoch_0001"
    if how == "truncated_state":
        data = (latest / "training_state.pt").read_bytes()
        (latest / "training_state.pt").write_bytes(data[: len(data) // 2])
    elif how == "garbage_state":
        (latest / "training_state.pt").write_bytes(b"not a checkpoint" * 10)
    elif how == "garbage_lora":
        (latest / "pytorch_lora_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    else:
        (latest / "pytorch_lora_weights.safetensors").unlink()


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(good_run, tmp_path):
    cases = ["truncated_state", "garbage_state", "garbage_lora", "missing_lora"]
    runs = [copy_of(good_run, tmp_path, how) for how in cases]
    for run, how in zip(runs, cases):
        damage(run, how)
    results = [ddpo("train", *FAST, "train.num_epochs=3", f"resume={run}") for run in runs]
    for run, how, result in zip(runs, cases, results):
        assert result.returncode == 0, (how, result.stderr[-3000:])
        assert "skipped an unreadable checkpoint: epoch_0001" in result.stderr, how
        assert "checkpoints/epoch_0000: epoch 1, global step 1" in result.stderr, how
        assert [r["epoch"] for r in read_metrics(run)] == [0, 1, 2], how
        superseded = list((run / "superseded").glob("*/epoch_0001"))
        assert len(superseded) == 1, "the damaged checkpoint is kept aside, not deleted"


def test_a_checkpoint_of_another_shape_is_refused_in_one_line(good_run, tmp_path):
    run = copy_of(good_run, tmp_path)
    before = snapshot(run)
    one_line_exit_2(ddpo("train", *FAST, "model.lora.rank=8", "train.num_epochs=3", f"resume={run}"),
                    "cannot resume", "model.lora")
    assert {k: v for k, v in snapshot(run).items() if ".hydra" not in str(k)} == \
        {k: v for k, v in before.items() if ".hydra" not in str(k)}


def test_resuming_an_older_checkpoint_keeps_what_came_after_it(good_run, tmp_path):
    run = copy_of(good_run, tmp_path)
    old_row = read_metrics(run)[1]
    result = ddpo("train", *FAST, "train.num_epochs=2", f"resume={run / 'checkpoints' / 'epoch_0000'}")
    assert result.returncode == 0, result.stderr[-3000:]
    (superseded,) = list((run / "superseded").iterdir())
    assert (superseded / "epoch_0001" / "training_state.pt").exists()
    assert read_metrics(superseded) == [old_row]
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1]


def test_a_resume_that_changes_the_objective_or_has_nothing_left_is_refused(good_run, cache_dir):
    # issue #23's probe: both were accepted silently (the second exited 0 having done nothing)
    from ddpo_cli.config import compose, plan_run
    from ddpo_cli.errors import UserError

    def plan(*overrides):
        return plan_run(compose("train", [*FAST, f"resume={good_run}", *overrides]))

    with pytest.raises(UserError, match=r"changes what the checkpoint was trained for \(algo.importance_sampling: "
                                        r"True -> False; algo.name: ddpo_is -> ddpo_sf\).*resume_allow_changes=true"):
        plan("train.num_epochs=3", "algo=ddpo_sf")
    with pytest.raises(UserError, match=r"reward._target_: ddpo_cli.rewards.jpeg.JpegCompressibility -> "
                                        r"ddpo_cli.rewards.aesthetic.Aesthetic"):
        plan("train.num_epochs=3", "reward=aesthetic")
    allowed = plan("train.num_epochs=3", "algo.clip_range=1e-3", "resume_allow_changes=true")
    assert "resumed with changes: algo.clip_range: 0.0001 -> 0.001" in allowed.warnings
    assert plan("train.num_epochs=3", "train.lr=1e-4").warnings == []   # other settings may change
    with pytest.raises(UserError, match=r"already at epoch 1 \(2 epochs trained\) and train.num_epochs=2: nothing"):
        plan("train.num_epochs=2")


# ----------------------------------------------------------------------------------------------- 6, 7, 10. bad values
BAD_VALUES = [
    (["train.lr=inf"], "train.lr=inf: must be a finite number"),
    (["sampler.guidance_scale=nan"], "sampler.guidance_scale=nan"),
    (["advantage.buffer_size=0"], "advantage.buffer_size=0"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm=-1"),
    (["algo.clip_range=-1"], "algo.clip_range=-1"),
    (["sampler.guidance_scale=-5"], "sampler.guidance_scale=-5"),
    (["device=tpu"], "device='tpu'"),
    (["sampler.eta=1.5"], "sampler.eta=1.5"),
    (["log.paired.every=-1"], "log.paired.every=-1"),
    (["log.paired.every=1", "log.paired.heldout=no_such_set"], "unknown prompts 'no_such_set'"),
    (["train.guidance_in_training=false"], "train.guidance_in_training=false"),
    (["train.cfg=false"], "train.cfg is now train.guidance_in_training"),   # renamed keys name their new name
    (["train.mixed_precision=bf16"], "train.mixed_precision is now precision"),
    (["model.lora.dropout=0.1"], "model.lora.dropout=0.1"),
    (["model.lora.dropout=2"], "model.lora.dropout=2"),
    (["model.lora.rank=0"], "model.lora.rank=0"),
    (["threads=-1"], "threads=-1"),
    (["log.grid_images=0"], "log.grid_images=0"),
    (["model.resolution=-32"], "model.resolution=-32"),
    (["run_name=x/../.."], "run_name='x/../..'"),
    (["log.project=../.."], "log.project='../..'"),
    (["train.timestep_window=[0.5,0.2]"], "[start, end]"),
    (["train.nonfinite_rewards=ignore"], "train.nonfinite_rewards"),
    (["prompts=from_file", "prompts.path={empty}"], "is empty"),
    (["prompts=from_file", "prompts.path={missing}"], "not found"),
    (["prompts=from_file", "prompts.path={latin1}"], "not UTF-8"),
    (["reward=custom", "reward.fn.path=no_such_module.reward"], "no_such_module"),
    # issue #23's probe: these were tracebacks after the run folder was made
    (["train.adam_beta1=1.5"], "train.adam_beta1=1.5: use a value in [0, 1)"),
    (["train.adam_epsilon=0", "train.adam_beta2=1"], "train.adam_beta2=1.0: use a value in [0, 1)"),
    (["train.adam_epsilon=0"], "train.adam_epsilon=0.0: use > 0"),
    (["train.weight_decay=-1"], "train.weight_decay=-1"),
    (["log.image_every=0"], "log.image_every=0: must be >= 1"),
    (["log.kl_to_base_every=-1"], "log.kl_to_base_every=-1"),
]


def bad_value_jobs(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    paths = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "nope.txt", "latin1": tmp_path / "latin1.txt"}
    base = [a for a in FAST if not a.startswith("prompts")]
    return [([*base, *(a.format(**paths) for a in args)], phrase) for args, phrase in BAD_VALUES]


def test_bad_values_are_refused_in_one_line_before_the_run(tmp_path, cache_dir):
    from ddpo_cli.config import compose, plan_run
    from ddpo_cli.errors import UserError

    for overrides, phrase in bad_value_jobs(tmp_path):
        with pytest.raises(UserError) as info:
            plan_run(compose("train", overrides), check_weights=True)
        assert phrase in str(info.value) and "\n" not in str(info.value), (overrides, str(info.value))


def test_bad_values_through_the_cli_exit_2_and_write_nothing(tmp_path, cache_dir):
    jobs = [job for job in bad_value_jobs(tmp_path)
            if any(key in " ".join(job[0]) for key in ("train.lr=inf", "run_name=", "latin1", "no_such_module",
                                                      "adam_beta1", "image_every"))]
    assert len(jobs) == 6
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda k: run_cli("train", *jobs[k][0], f"hydra.run.dir={tmp_path / f'run{k}'}"),
                                range(len(jobs))))
    for k, ((overrides, phrase), result) in enumerate(zip(jobs, results)):
        one_line_exit_2(result, phrase, alone=True)
        assert not (tmp_path / f"run{k}").exists(), overrides


def test_printing_the_config_checks_its_keys_in_one_line(tmp_path):
    # issue #23's probe: `--cfg job` with an unknown key exited 1 with Hydra's own message
    results = [run_cli("train", "--cfg", "job", *args, cwd=tmp_path)
               for args in (["train.no_such_key=1"], ["model=tiny", "train.lr=3e-4"])]
    one_line_exit_2(results[0], "train.no_such_key", alone=True)
    assert results[1].returncode == 0 and "lr: 0.0003" in results[1].stdout, results[1].stderr[-2000:]
    assert not any(tmp_path.iterdir())   # printing writes nothing


def test_a_custom_reward_of_the_wrong_shape_is_named_in_one_line(tmp_path, helpers, cache_dir):
    cases = [("scalar", "shape () for 4 images"), ("strings", "returned list"), ("nothing", "returned NoneType"),
             ("one_short", "shape (3,) for 4 images"),
             ("raises", "raised KeyError ('a key the reward forgot'): fix the reward")]  # issue #23: a traceback
    results = [ddpo("train", *FAST, *custom(fn), "train.num_epochs=1", f"hydra.run.dir={tmp_path / fn}", env=helpers)
               for fn, _ in cases]
    for (fn, phrase), result in zip(cases, results):
        one_line_exit_2(result, f"reward {fn}", phrase)


def test_several_updates_without_importance_weights_get_a_word():
    from ddpo_cli.config import compose, plan_run

    plan = plan_run(compose("train", [*FAST, "algo=ddpo_sf", "train.batch_size=2"]))
    assert plan.warnings and "ddpo_sf has no importance weight, but each epoch's samples feed 2 updates" in \
        plan.warnings[0]
    assert not plan_run(compose("train", [*FAST, "algo=ddpo_is", "train.batch_size=2"])).warnings
    assert not plan_run(compose("train", [*FAST, "algo=ddpo_sf"])).warnings


def test_lora_targets_that_match_nothing_are_one_line(tmp_path, cache_dir):
    one_line_exit_2(ddpo("train", *FAST, "model.lora.target_modules=[no_such_layer]", "train.num_epochs=1",
                        f"hydra.run.dir={tmp_path / 'run'}"), "model.lora.target_modules=['no_such_layer']")


# ----------------------------------------------------------------------------------------------- 9. Ctrl-C
@pytest.mark.parametrize("family", [FAST, FLOW[:-1]], ids=["sd", "flow"])
def test_ctrl_c_does_not_wait_for_the_reward_in_flight(tmp_path, helpers, cache_dir, family):
    # SIGINT goes once the reward call has started (set-up time varies). The child gets SIGINT's default action back:
    # a shell runs a background job (`.ci/run &`) with SIGINT ignored, every process below inherits that, and a
    # Python started with SIGINT ignored installs no KeyboardInterrupt handler, so the run slept on through the
    # signal (the "hang" of the session-6 CI runs; a terminal's Ctrl-C reaches a foreground job)
    started = tmp_path / "reward_started"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLOW_REWARD_STARTED": str(started), **helpers}
    process = subprocess.Popen([sys.executable, "-m", "ddpo_cli", "train", *family, *custom("slow"),
                                "train.num_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert started.exists(), process.communicate(timeout=60)[1][-2000:]
    time.sleep(1)  # the worker thread is inside time.sleep
    sent = time.perf_counter()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.perf_counter() - sent < 10, "Ctrl-C waited for the reward call"
    assert process.returncode == 130 and "interrupted" in stderr and "resume=" in stderr, stderr[-2000:]


def test_the_guards_by_hand():
    import numpy as np

    from ddpo_cli.errors import UserError
    from ddpo_cli.guards import check_gradient, check_rewards, check_weights

    rewards, prompts = np.array([0.5, float("nan"), 0.2, float("inf")]), ["a", "b", "c", "d"]
    with pytest.raises(UserError, match=r"reward r returned 2 non-finite value\(s\) .* among 4 in epoch 3, e.g. for "
                                        r"the prompt 'b'"):
        check_rewards(rewards, prompts, "r", 3, "stop")
    assert check_rewards(rewards, prompts, "r", 3, "drop").tolist() == [True, False, True, False]
    with pytest.raises(UserError, match="no finite value"):
        check_rewards(np.full(4, np.nan), prompts, "r", 3, "drop")
    # issue #23: finite rewards whose statistics overflow trained on with reward_std inf
    with pytest.raises(UserError, match=r"reward r returned values too large to normalise in epoch 3 \(largest "
                                        r"\|r\| = 1e\+308"):
        check_rewards(np.array([1e308, -1e308, 0.0, 1.0]), prompts, "r", 3, "stop")
    check_gradient(torch.tensor(1.5), 7)
    with pytest.raises(UserError, match="global step 7 produced a non-finite gradient"):
        check_gradient(torch.tensor(float("nan")), 7)
    check_weights([torch.ones(3)], 2)
    with pytest.raises(UserError, match="no checkpoint was written"):
        check_weights([torch.ones(3), torch.tensor([1.0, float("inf")])], 2)


def test_sample_and_eval_refuse_non_finite_values():
    from ddpo_cli.config import compose
    from ddpo_cli.errors import UserError
    from ddpo_cli.config.checks import validate_sample

    for override, phrase in (("lora_scale=inf", "lora_scale=inf: must be a finite number"),
                             ("sampler.guidance_scale=nan", "sampler.guidance_scale=nan"),
                             ("sampler.eta=2", "sampler.eta=2")):
        with pytest.raises(UserError, match=phrase.replace("[", r"\[")):
            validate_sample(compose("sample", ["model=tiny", override]))
