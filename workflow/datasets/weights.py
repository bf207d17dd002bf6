"""The torchvision IMAGENET1K_V1 weight files, fetched into ``{RES}/weights/`` for offline jobs.

Each file is downloaded with the shared client (resume, retries, progress, disk check, atomic
placement), then checked the way torchvision checks it: the file's sha256 must start with the
hash in its name. A file that fails is deleted. Benchmark jobs read the folder and never
download.

The self-supervised presets' files (timm's Hugging Face ``model.safetensors``, named
``<repo>.safetensors`` here) carry no hash in their names: a digest pinned in the table
(``NodeSpec.weights_sha256``) is verified when set; either way the sha256 of what was
downloaded is recorded in ``checksums.json`` next to the file, and later runs verify the
file against that record (the shared client's rule for files without a published checksum).
In a user's folder (``lossnets.weights_dir``) such a file may also be in the Hugging Face hub
cache layout (``archs.weights_file_in``).

:func:`read_state_dict` reads a weights file as torchvision publishes it (or as a user saved
one): the zip serialisation of PyTorch >= 1.6 and the legacy (pickle) serialisation of the
older files, with ``torch.load(weights_only=True)``, so no code in the file runs. What is not
a state_dict is refused with the file, the config key and the fix named.
:func:`torchvision_keys` renames the legacy keys of the published DenseNet files the way
torchvision's own loader does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from workflow.archs import (
    arch_spec,
    register_custom,
    weights_file_in,
    weights_filename,
    weights_url,
)
from workflow.datasets.fetch import ChecksumBook, DownloadError, fetch, mirror_url
from workflow.files import sha256_file

__all__ = ["WeightsFileError", "fetch_weights", "read_state_dict", "refetch",
           "torchvision_keys", "verify_folder", "verify_weights_file"]


class WeightsFileError(ValueError):
    """A weights file that cannot give a loss network its weights; the message names the
    file, the config key and what to do."""


def _hash_prefix(name: str) -> str | None:
    stem = name.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1]
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


def verify_weights_file(path: Path) -> None:
    """torchvision's check: the file's sha256 starts with the hash in its name."""
    prefix = _hash_prefix(path.name)
    if prefix is None:
        return
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise RuntimeError(
            f"{path}: sha256 {digest[:16]}... does not start with {prefix}; the file is "
            f"corrupt. Delete it and fetch it again with `snakemake --cores 1 download_weights`.")


def fetch_weights(archs: Iterable[str], out: str | Path, mirror: str | None = None,
                  progress: bool = True, retries: int = 5,
                  custom: Mapping[str, Any] | None = None) -> list[Path]:
    """Download and verify the weight files of ``archs`` into the folder ``out``
    (``custom``: the config ``lossnets.custom`` entries among them).

    A ``mirror`` that is a local folder rather than a URL (config ``lossnets.weights_dir``,
    e.g. a torch hub cache) is only verified: :func:`verify_folder`.
    """
    if custom:
        register_custom(custom)
    if mirror and not mirror.startswith(("http://", "https://")):
        return verify_folder(archs, mirror, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    book = ChecksumBook(out / "checksums.json")
    paths = []
    try:
        for arch in archs:
            url = mirror_url(weights_url(arch), mirror)
            pin = _pinned(arch)
            dest = fetch(url, out / weights_filename(arch), sha256=pin, book=book,
                         progress=progress, retries=retries)
            try:
                verify_weights_file(dest)
            except RuntimeError as e:
                dest.unlink(missing_ok=True)
                book.entries.pop(book.key(dest), None)
                raise DownloadError(f"{url}: {e} (deleted)") from None
            if _is_published_unnamed(arch):
                how = ("verified against the table's pin" if pin else
                       f"recorded in {book.path} (the table pins no digest)")
                print(f"{dest}: sha256 {(book.get(dest) or {}).get('sha256', '?')} {how}")
            paths.append(dest)
    finally:
        book.save()
    return paths


def _pinned(arch: str) -> str | None:
    """The sha256 the table pins for ``arch``'s file (the self-supervised presets' field
    ``weights_sha256``; empty: none is known), or None."""
    return getattr(arch_spec(arch), "weights_sha256", "") or None


def _is_published_unnamed(arch: str) -> bool:
    """A file whose name carries no hash (the self-supervised presets' safetensors)."""
    return getattr(arch_spec(arch), "library", "torchvision") != "torchvision"


def verify_folder(archs: Iterable[str], folder: str | Path, out: str | Path) -> list[Path]:
    """Check the torchvision files of ``archs`` in the user's ``folder`` (config
    ``lossnets.weights_dir``) as torchvision checks a download, reading them only; write
    ``out/<file>.json`` (sha256, size, mtime, source) for each (jobs take it as an
    ``ancient`` input: it must exist; the user's file decides reruns)."""
    import os

    from workflow.files import write_json

    folder = Path(os.path.expanduser(str(folder)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for arch in archs:
        src = weights_file_in(arch, folder)
        where = f"config key lossnets.weights_dir ({folder})"
        if not src.is_file():
            raise WeightsFileError(f"{where}: {src.name} is missing ({arch}); put "
                                   f"torchvision's file there or unset the key")
        st = src.stat()
        digest = sha256_file(src)
        pin = _pinned(arch)
        if pin and digest != pin:
            raise WeightsFileError(
                f"{where}: {src} has sha256 {digest[:16]}..., not the {pin[:16]}... the table "
                f"pins for {arch}: the file is damaged or another one. Replace it; this "
                f"workflow never writes there")
        prefix = _hash_prefix(src.name)
        if prefix and not digest.startswith(prefix):
            raise WeightsFileError(
                f"{where}: {src} has sha256 {digest[:16]}..., which does not start with "
                f"{prefix} as its name says: the file is damaged. Replace it (torchvision "
                f"downloads it again once it is deleted); this workflow never writes there")
        rec = out / f"{weights_filename(arch)}.json"
        write_json({"arch": arch, "source": str(src.resolve()), "sha256": digest,
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns}, rec)
        records.append(rec)
        print(f"{src}: sha256 {digest[:12]}... verified")
    return records


# ----------------------------------------------------------------------------- reading


def _sniff(path: Path) -> str:
    """The file's serialisation from its first bytes: zip (torch >= 1.6, TorchScript),
    pickle (torch.save's legacy format), tar (PyTorch's format before 2017), safetensors
    (an 8-byte little-endian header length, then the JSON header: the Hugging Face files of
    the self-supervised presets), empty, other."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") \
            <= path.stat().st_size - 8:
        return "safetensors"
    if head[257:262] == b"ustar":
        return "tar"
    return "pickle" if head[:1] == b"\x80" else "other"


def _start(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(48)
    try:
        text = head.decode()
    except UnicodeDecodeError:
        return f"bytes {head[:16]!r}"
    return f"the text {text.splitlines()[0] if text.strip() else text!r}"


def refetch(key: str) -> str:
    """How to replace a bad file of config key ``key``: the ImageNet files are fetched again
    (the empty string for a user's own file)."""
    return ("delete it and fetch it again with `snakemake --cores 1 download_weights`"
            if key == "lossnets.weights" else "")


def read_state_dict(path: str | Path, key: str) -> dict[str, Any]:
    """The ``{name: tensor}`` state_dict in ``path``, read with ``weights_only=True``.

    ``key`` is the config key that named the file (it goes into every message). Refused with
    a :class:`WeightsFileError`: an empty, text or truncated file, PyTorch's pre-2017 tar
    format (``weights_only`` cannot read it), a TorchScript archive, a pickled module or
    other Python objects, and anything that is not a mapping of names to tensors.
    """
    import torch

    path = Path(path)
    where = f"{path} (config key {key})"
    fix = refetch(key) or "save one with torch.save(model.state_dict(), path)"
    kind = _sniff(path)
    if kind == "empty":
        raise WeightsFileError(f"{where} is empty; {fix}")
    if kind == "other":
        raise WeightsFileError(
            f"{where} is not a PyTorch file: it starts with {_start(path)} (a Git LFS pointer "
            f"or an error page saved in its place?); {fix}")
    if kind == "safetensors":
        return _read_safetensors(path, where, fix)
    if kind == "tar":
        raise WeightsFileError(
            f"{where} is in PyTorch's tar serialisation (before 2017), which "
            f"torch.load(weights_only=True) refuses; if you trust the file, re-save it once "
            f"with torch.save(torch.load(path, weights_only=False), path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "TorchScript" in text:
            raise WeightsFileError(
                f"{where} is a TorchScript archive, not a state_dict; save "
                f"torch.jit.load(path).state_dict() with torch.save") from None
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" (it needs {found.group(1)})" if found else ""
            raise WeightsFileError(
                f"{where} holds pickled Python objects{what}, not only tensors: a whole model "
                f"saved with torch.save(model)? torch.load(weights_only=True) does not run "
                f"them; {fix}") from None
        first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(e).__name__
        raise WeightsFileError(
            f"{where} cannot be read by torch.load ({first}): a truncated download? "
            f"{refetch(key) or 'Fetch or save it again'}") from None
    if not isinstance(obj, Mapping):
        raise WeightsFileError(
            f"{where} holds a {type(obj).__name__}, not a state_dict (a dict of parameter "
            f"names to tensors); {fix}")
    if not obj:
        raise WeightsFileError(f"{where} holds an empty dict, not a state_dict; {fix}")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
            hint = (f" (a training checkpoint? its entry {nested[0]!r} may be the state_dict: "
                    f"save that entry alone)" if nested else "")
            raise WeightsFileError(
                f"{where} is not a state_dict: its entry {name!r} is a {type(value).__name__}, "
                f"not a tensor{hint}; {fix}")
    return dict(obj)


def _read_safetensors(path: Path, where: str, fix: str) -> dict[str, Any]:
    """A safetensors file's tensors (no code can be in one), with the same refusals."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsFileError(
            f"{where} is a safetensors file, and the safetensors package is not installed: it "
            f"comes with the optional extra 'ssl' (`uv sync --extra ssl`)") from None
    try:
        obj = load_file(str(path), device="cpu")
    except Exception as e:
        raise WeightsFileError(f"{where} cannot be read as safetensors ({e}): a truncated "
                               f"download? {fix}") from None
    if not obj:
        raise WeightsFileError(f"{where} holds no tensors; {fix}")
    return dict(obj)


# torchvision.models.densenet._load_state_dict: the published DenseNet files (and any state_dict
# saved before module names could not hold '.') name a dense layer's modules 'norm.1', 'relu.1',
# 'conv.1', 'norm.2', ...; the modules are now 'norm1', 'conv1', ...
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def torchvision_keys(builder: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the keys torchvision's loader of ``builder`` renames renamed.

    Only the DenseNets have such a loader (the legacy key pattern above, the same regular
    expression as torchvision's); every other architecture's file loads as it is.
    """
    if not builder.startswith("densenet"):
        return dict(state)
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _DENSENET_LEGACY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out
