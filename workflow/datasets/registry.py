"""The datasets by name: download, synthesize and prepare one, as the data rules ask.

Every dataset module follows one contract (docs/DEVELOPING.md): ``FILES`` (what to fetch),
an optional ``download(raw_dir, fetcher, **options)`` for datasets that are not a list of
files (COCO's partial zip reads, the roads index pages), ``synthesize(raw_dir, seed,
**sizes)``, ``prepare(raw_dir, out_dir, **options)`` and ``load(prepared_dir, split)``.

A raw tree is complete when its ``READY`` marker exists (written last by :func:`download`,
its link of a ``data.paths`` folder, and :func:`synthesize`); a prepared folder when its
``manifest.json`` exists (written last by the module's ``prepare``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from workflow.datasets import mark_ready

__all__ = ["MODULES", "download", "module", "prepare", "synthesize", "urls"]

MODULES = {name: f"workflow.datasets.{name}"
           for name in ("bapps", "coco", "sr_test", "roads", "svhn", "stl10",
                        "tid2013", "kadid10k", "csiq", "nights")}


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(MODULES[name])
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(MODULES)}") from None


def urls(name: str) -> list[str]:
    """The upstream URLs of a dataset (what ``snakemake -n download`` lists), read from
    :mod:`workflow.datasets.sources` without importing the dataset's module."""
    from workflow.datasets.sources import FILES

    return [f.url for f in FILES[name]]


def _accepted(fn: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


def download(name: str, raw: str | os.PathLike, options: Mapping[str, Any] | None = None,
             mirror: str | None = None, progress: bool = True,
             settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fetch (and extract) a dataset into ``raw``, then write ``raw/READY``.

    ``options`` is config ``data.<name>`` without its synthetic sizes: pinned ``checksums``
    replace the built-in ones; the rest goes to the module's own ``download`` if it has one.
    ``settings``: ``archive_limits`` (config ``data.<name>.archive_limits``), what an archive
    may hold before extraction refuses it. ``options["folder"]`` (config
    ``data.paths.<name>``, what the ``link_dataset`` rule passes): take the dataset from that
    folder instead, verified and never modified (:func:`user_folders.link`).
    """
    from workflow.datasets import user_folders
    from workflow.datasets.archives import ArchiveLimits, extract_archive
    from workflow.datasets.fetch import Fetcher

    opts = dict(options or {})
    raw = Path(raw)
    folder = opts.pop("folder", None)
    if folder:
        workers = int((settings or {}).get("threads") or 0) or 8
        return user_folders.link(name, folder, raw, opts, workers=workers)
    raw.mkdir(parents=True, exist_ok=True)
    user_folders.forget(raw)  # links of an earlier data.paths: never write through them
    (raw / "READY").unlink(missing_ok=True)
    mod = module(name)
    limits = ArchiveLimits.from_config((settings or {}).get("archive_limits"),
                                       key=f"data.{name}.archive_limits")
    fetcher = Fetcher(raw, mirror=mirror or None, progress=progress,
                      checksums=opts.pop("checksums", None))
    try:
        if hasattr(mod, "download"):
            info = dict(mod.download(raw, fetcher, **_accepted(mod.download, opts)) or {})
        else:
            files = {}
            for rf in mod.FILES:
                path = fetcher.fetch(rf)
                entry = fetcher.book.get(path) or {}
                if rf.extract:
                    extract_archive(path, raw, key=entry.get("sha256"), limits=limits)
                files[rf.name] = entry
            info = {"files": files}
    finally:
        fetcher.book.save()
    info.update(dataset=name, source="download", mirror=mirror or None)
    mark_ready(raw, info)
    return info


def synthesize(name: str, raw: str | os.PathLike, seed: int = 0,
               options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write a small fake of the dataset in its exact raw upstream layout, then ``READY``.

    ``seed``: config ``data.seed``. ``options``: config ``data.<name>``; its ``synthetic``
    sizes go to the module's ``synthesize``, and so do the other keys it names as
    parameters (COCO's draw sizes ``n_train`` / ``n_val``), except ``seed``.
    """
    opts = dict(options or {})
    sizes = dict(opts.pop("synthetic", None) or {})
    opts.pop("seed", None)
    raw = Path(raw)
    from workflow.datasets.user_folders import forget

    forget(raw)  # links of an earlier data.paths: never write through them
    (raw / "READY").unlink(missing_ok=True)
    fn = module(name).synthesize
    kwargs = {**_accepted(fn, opts), **sizes}
    fn(raw, seed=int(seed), **kwargs)
    info = {"dataset": name, "source": "synthetic", "seed": seed, "options": kwargs}
    mark_ready(raw, info)
    return info


def prepare(name: str, raw: str | os.PathLike, out: str | os.PathLike,
            options: Mapping[str, Any] | None = None,
            settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Decode a complete raw tree into arrays in ``out``; ``manifest.json`` is written last.

    ``settings``: ``threads``, the decoding threads (the rule's threads; all cores if unset).
    """
    from workflow.files import disk_full_errors, write_json

    raw, out = Path(raw), Path(out)
    if not (raw / "READY").exists():
        raise FileNotFoundError(
            f"{raw}/READY is missing: the raw tree of {name} is incomplete. Run "
            f"`snakemake --cores 1 {raw}/READY` (download or synthesize) first.")
    (out / "manifest.json").unlink(missing_ok=True)
    try:
        linked = json.loads((raw / "READY").read_text()).get("source") == "user"
    except (ValueError, AttributeError):  # a READY written by hand
        linked = False
    if linked:
        from workflow.datasets.user_folders import check_unchanged

        check_unchanged(name, raw)  # config data.paths: the files the link verified
    fn = module(name).prepare
    kwargs = _accepted(fn, dict(options or {}))
    workers = int((settings or {}).get("threads") or 0)
    if workers and "workers" in inspect.signature(fn).parameters:
        kwargs["workers"] = workers
    with disk_full_errors(out, f"the prepared {name} arrays"):
        manifest = fn(raw, out, **kwargs)
    if not (out / "manifest.json").exists():
        write_json(manifest, out / "manifest.json")
    return manifest
