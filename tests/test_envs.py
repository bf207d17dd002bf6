"""Software environments: the conda env file of `--sdm conda` matches the package's
dependencies, uses current channels and installs nothing editable; the rules' commands
import the `workflow` package from the checkout without any install of it."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import sysconfig
import tomllib

import yaml

from tests.snakemake_helpers import ROOT, snakemake

CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name, where they differ


def _env(name: str) -> dict:
    return yaml.safe_load((ROOT / "envs" / name).read_text())


def _requirement(spec: str) -> tuple[str, str]:
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", spec.strip())
    assert m, spec
    return m[1].lower(), m[2].replace(" ", "")


def test_conda_env_has_the_package_dependencies_and_current_channels():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = _env("workflow.yaml")
    conda = dict(_requirement(d) for d in env["dependencies"] if isinstance(d, str))
    for spec in deps:
        name, bound = _requirement(spec)
        name = CONDA_NAMES.get(name, name)
        assert name in conda, f"envs/workflow.yaml lacks {name} (pyproject: {spec})"
        if bound and name != "snakemake-executor-plugin-slurm":
            assert conda[name] == bound, (name, conda[name], bound)
    assert "pytorch" not in env["channels"] and "defaults" not in env["channels"]
    assert {"conda-forge", "bioconda"} <= set(env["channels"])
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert not pip, "the rules import the package from the checkout: no pip install"


def test_every_conda_directive_names_an_env_file():
    for smk in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        for ref in re.findall(r"conda:\s*\n\s*\"([^\"]+)\"", smk.read_text()):
            base = ROOT if smk.name == "Snakefile" else smk.parent
            assert (base / ref).resolve().is_file(), f"{smk.name}: conda env {ref} missing"


def test_jobs_import_the_package_from_the_checkout_without_an_install(tmp_path):
    """A job's `python` that ignores every .pth file (so the editable install is invisible)
    and runs outside the checkout still finds `workflow`: the Snakefile's job prefix puts the
    checkout on PYTHONPATH."""
    site = sysconfig.get_paths()["purelib"]
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nPYTHONPATH=\"$PYTHONPATH:{site}\" exec {sys.executable} -S "
                    f"\"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env_path = f"{shim.parent}:{os.environ['PATH']}"
    out = tmp_path / "results" / "adaptation" / "rankings.json"
    proc = snakemake("--cores", "1", "--configfile", str(ROOT / "config" / "demo.yaml"),
                     "--config", f"results_dir={tmp_path / 'results'}",
                     f"resources_dir={tmp_path / 'res'}", "--", str(out),
                     workdir=tmp_path, timeout=600, env={"PATH": env_path, "PYTHONPATH": None})
    assert out.exists(), proc.stderr[-3000:]
    assert json.loads(out.read_text())
