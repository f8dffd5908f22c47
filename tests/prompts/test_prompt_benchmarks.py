"""Benchmark prompt lists (PartiPrompts, DrawBench) from user-supplied files in their published formats."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ddpo_cli.config import build, check_target
from ddpo_cli.errors import UserError
from ddpo_cli.prompts.benchmarks import drawbench, parti_prompts

# the first rows of each file as published (PartiPrompts.tsv's header and lines; DrawBench's CSV export)
PARTI = (Path(__file__).resolve().parents[1] / "data" / "parti_sample.tsv").read_text(encoding="utf-8")
DRAWBENCH = (Path(__file__).resolve().parents[1] / "data" / "drawbench_sample.csv").read_text(encoding="utf-8")


def test_parti_prompts_read_with_metadata_and_filters(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(PARTI, encoding="utf-8")
    every = parti_prompts(str(path))
    assert every.prompts[:2] == ["bond", "a shiba inu"] and len(every) == 4
    assert every.items[0][1] == {"category": "Abstract", "challenge": "Basic",
                                 "note": "Biology-inspired concepts with multiple meanings"}
    assert parti_prompts(str(path), categories=["Animals"], challenges=["Quantity"]).prompts == ["four cats"]
    with pytest.raises(UserError, match="no challenge \\['Counting'\\]: choose from"):
        parti_prompts(str(path), challenges=["Counting"])


def test_drawbench_reads_the_csv_export(tmp_path):
    path = tmp_path / "drawbench.csv"
    path.write_text(DRAWBENCH, encoding="utf-8")
    counting = drawbench(str(path), categories=["Count"])
    assert counting.prompts == ["One cat and two dogs sitting on the grass."]
    assert counting.items[0][1] == {"category": "Count"}
    assert drawbench(str(path)).prompts[2] == "A pink colored giraffe, with a hat."


def test_missing_or_wrong_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found: download it once"):
        parti_prompts(str(tmp_path / "nope.tsv"))
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("text\tlabel\nhello\tx\n")
    with pytest.raises(UserError, match="no 'Prompt' column"):
        parti_prompts(str(wrong))


@pytest.mark.parametrize("name", ["parti", "drawbench"])
def test_yaml_builds_from_a_path(name, tmp_path):
    from ddpo_cli.config import conf_dir

    path = tmp_path / "prompts.txt"
    path.write_text(PARTI if name == "parti" else DRAWBENCH, encoding="utf-8")
    node = OmegaConf.load(conf_dir() / "prompts" / f"{name}.yaml")
    node.path = str(path)
    check_target(node, "prompts")
    assert len(build(node, "prompts")) in (3, 4)


def test_the_shipped_parti_prompts_are_the_published_file():
    from ddpo_cli.prompts.sets import ASSETS

    shipped = parti_prompts()  # the default: ddpo_cli/assets/PartiPrompts.tsv
    categories = {meta["category"] for _, meta in shipped.items}
    challenges = {meta["challenge"] for _, meta in shipped.items}
    assert len(shipped) == 1632 and len(categories) == 12 and len(challenges) == 11  # the paper's counts
    assert shipped.prompts[:3] == ["bond", "element", "molecule"] and "a shiba inu" in shipped.prompts
    assert len((ASSETS / "PartiPrompts.tsv").read_text(encoding="utf-8")) == 123072  # characters, as published
    assert "Apache License" in (ASSETS / "PartiPrompts.LICENSE").read_text(encoding="utf-8")


def test_a_run_written_before_the_prompts_package_still_opens(tmp_path):
    # the prompt modules moved into ddpo_cli/prompts/ (issue #24); a run folder names the old _target_s
    from ddpo_cli.config import build
    from ddpo_cli.runs import RUN_CONFIG, load_run_config

    (tmp_path / RUN_CONFIG).parent.mkdir(parents=True)
    (tmp_path / RUN_CONFIG).write_text("prompts:\n  _target_: ddpo_cli.prompt_benchmarks.parti_prompts\n"
                                       "  categories: [Abstract]\n")
    prompts = load_run_config(tmp_path).prompts
    assert prompts._target_ == "ddpo_cli.prompts.parti_prompts" and len(build(prompts, "prompts")) == 51
