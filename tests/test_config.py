"""Config validation: a wrong key or value stops before the DAG is built, naming the key."""

from __future__ import annotations

import pytest
import yaml

from tests.snakemake_helpers import ROOT, snakemake
from workflow.config import select_lossnets
from workflow.lossnets import UnknownLossNetError


def _dry_run_with(tmp_path, mutate) -> str:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(path), check=False, timeout=300)
    assert proc.returncode != 0, "an invalid config was accepted"
    return proc.stdout + proc.stderr


def test_unknown_top_level_key_is_named(tmp_path):
    out = _dry_run_with(tmp_path, lambda c: c.update(presicion="fp32"))
    assert "presicion" in out and "Additional properties" in out


def test_wrong_value_is_named(tmp_path):
    out = _dry_run_with(tmp_path, lambda c: c.update(precision="fp16"))
    assert "precision" in out and "fp16" in out


def test_unknown_key_in_a_section_is_named(tmp_path):
    out = _dry_run_with(tmp_path, lambda c: c["similarity"].update(batchsize=3))
    assert "batchsize" in out and "similarity" in out


def test_unknown_arch_lists_known_ones():
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["similarity"]["lossnets"] = ["alexnett/2"]
    with pytest.raises(UnknownLossNetError) as e:
        select_lossnets(cfg, "similarity")
    msg = str(e.value)
    assert "similarity.lossnets" in msg and "alexnett" in msg and "squeezenet1_1" in msg


def test_full_config_selects_the_study_grid():
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    nets = select_lossnets(cfg, "similarity")
    assert len([n for n in nets if n.layer != "lpips"]) == 56
    assert {n.arch for n in nets if n.layer == "lpips"} == {"alexnet", "vgg16", "squeezenet1_1"}


def test_snakemake_lint_is_clean():
    proc = snakemake("--lint", "--configfile", str(ROOT / "config" / "demo.yaml"), check=False,
                     timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
