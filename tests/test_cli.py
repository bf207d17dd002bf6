"""The command table (workflow/cli.py): every command exists, takes what it says, fails
clearly, and `--help` answers without importing torch."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

from tests.snakemake_helpers import ROOT
from workflow.cli import ARGS, COMMANDS, PERF, main


@pytest.mark.parametrize("key", sorted(COMMANDS), ids=lambda k: " ".join(k))
def test_every_command_matches_its_function(key):
    spec = COMMANDS[key]
    module, _, name = spec.target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    params = inspect.signature(fn).parameters
    assert set(spec.args) <= set(params), f"{spec.target} lacks {set(spec.args) - set(params)}"
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= set(spec.args), f"{spec.target} needs {required - set(spec.args)}"
    assert all(a in ARGS for a in spec.args)


def test_every_perf_name_has_a_module():
    for name in PERF:
        assert hasattr(importlib.import_module(f"workflow.perf.{name}"), "main")


def test_help_is_quick_and_lists_every_command():
    code = ("import sys; from workflow.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules and 'pandas' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for group, cmd in COMMANDS:
        assert f"{group} {cmd}" in proc.stdout


def test_unknown_command_and_bad_arguments(capsys):
    assert main(["nosuch", "thing"]) == 2
    assert "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the missing argument
        main(["results", "gather"])
    assert "--out" in capsys.readouterr().err


def test_project_errors_are_one_clear_line(tmp_path, capsys):
    rc = main(["data", "prepare", "svhn", "--raw", str(tmp_path / "raw"), "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error:") and "READY is missing" in err
    assert "Traceback" not in err


def test_prepared_folders_are_found_by_their_manifest(prepared, capsys):
    """--prepared takes folders or manifests in any order; a missing dataset is named."""
    from workflow.cli import run

    bapps = prepared("bapps")
    with pytest.raises(FileNotFoundError, match="prepared coco dataset"):
        run("super_resolution", "train", ["--net", "alexnet/2", "--scale", "4", "--run", "0",
                                          "--config", "{}", "--prepared", str(bapps),
                                          "--workdir", "w", "--out", "m.pt"])
