"""``python -m workflow <command> ...``: what the Snakemake rules call.

``python -m workflow bench NAME [args]`` runs ``workflow.bench.NAME.main(args)``;
``python -m workflow MODULE [args]`` runs ``workflow.MODULE.main(args)`` for any
module of the package that defines ``main`` (e.g. ``benchmarks.similarity``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import workflow


def _commands() -> list[str]:
    names = []
    for m in pkgutil.walk_packages(workflow.__path__, "workflow."):
        if m.name.endswith("__main__") or m.name == "workflow.cli":
            continue
        try:
            if hasattr(importlib.import_module(m.name), "main"):
                names.append(m.name.removeprefix("workflow."))
        except Exception:  # a module that fails to import is not a command
            continue
    return names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:\n  " + "\n  ".join(_commands()))
        return 0
    name, rest = argv[0], argv[1:]
    if name == "bench":
        if not rest:
            print("usage: python -m workflow bench NAME [args]; NAMEs: "
                  + ", ".join(c.removeprefix("bench.") for c in _commands() if c.startswith("bench.")))
            return 2
        name, rest = f"bench.{rest[0]}", rest[1:]
    try:
        module = importlib.import_module(f"workflow.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(f"workflow.{name.split('.')[0]}"):
            print(f"unknown command {name!r}; commands: {', '.join(_commands())}", file=sys.stderr)
            return 2
        raise
    if not hasattr(module, "main"):
        print(f"workflow.{name} has no main(); commands: {', '.join(_commands())}", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)
