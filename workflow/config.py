"""Reading the workflow config: loss-network selection and the settings every job shares."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workflow.lossnets import LossNet

# workflow.lossnets (and so torch) is imported inside the functions that need it: data jobs
# import this module for json_arg / as_json and should not pay for importing torch.


COMMON_KEYS = ("device", "precision", "resources_dir", "results_dir")


def study_lossnets(config: Mapping[str, Any]) -> list[LossNet]:
    """The global grid of config key ``lossnets`` (archs x layers, without LPIPS sets)."""
    from workflow.lossnets import all_lossnets

    ln = config["lossnets"]
    return all_lossnets(ln["archs"], [str(x) for x in ln["layers"]])


def select_lossnets(config: Mapping[str, Any], section: str) -> list[LossNet]:
    """Loss networks of one benchmark: ``<section>.lossnets`` is ``all`` (the global grid)
    or a list of ``arch/layer`` ids; ``<section>.lpips_sets: true`` adds the global LPIPS sets."""
    from workflow.lossnets import LossNet, UnknownLossNetError

    sec = config[section]
    chosen = sec.get("lossnets", "all")
    try:
        nets = study_lossnets(config) if chosen == "all" else [LossNet.parse(str(s)) for s in chosen]
        if sec.get("lpips_sets", False):
            nets += [LossNet(a, "lpips") for a in config["lossnets"]["lpips_sets"]]
    except UnknownLossNetError as e:
        raise UnknownLossNetError(f"config key {section}.lossnets: {e}") from None
    return list(dict.fromkeys(nets))


def weights_for(config: Mapping[str, Any], arch: str) -> str:
    """``imagenet`` | ``random`` | a state_dict path, for one architecture."""
    ln = config["lossnets"]
    return str(ln.get("weights_paths", {}).get(arch, ln["weights"]))


def lossnet_params(config: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """What a job needs to build an extractor for ``arch`` (a rule param: a rerun trigger)."""
    return {
        "arch": arch,
        "weights": weights_for(config, arch),
        "weights_dir": str(Path(config["resources_dir"]) / "weights"),
        "seed": int(config["lossnets"].get("seed", 0)),
    }


def common(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in COMMON_KEYS}


def as_json(obj: Any) -> str:
    """Compact JSON for a rule param (pass with ``{params.x:q}`` in shell)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def json_arg(text: str) -> Any:
    """argparse ``type=`` for JSON parameters; ``@file.json`` reads a file."""
    try:
        if text.startswith("@"):
            return json.loads(Path(text[1:]).read_text())
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text[:200]}") from None
