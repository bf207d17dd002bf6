"""What the rules ask: the config made complete, and every target, input and param of a stage.

This is the one package module the Snakefile and ``rules/*.smk`` import, and it imports
neither torch nor pandas, so ``snakemake -n`` builds the DAG of the full study in seconds.

Three things live here:

* **The config, complete.** :func:`complete_config` validates the merged config against
  ``workflow/schemas/*.schema.yaml`` and fills every missing key with the schema's default
  (the study's value), once. Commands then receive complete settings and apply no defaults
  of their own.
* **What each stage's results depend on.** :data:`STAGES` says, per benchmark and stage,
  which config keys change its numbers (``depends``: the rule's params, hence Snakemake's
  rerun trigger) and which only change how it runs (``settings``: batch sizes of inference,
  data placement, log and checkpoint intervals; passed to the job but never a rerun
  trigger). :data:`DAG_KEYS` are the keys that choose which jobs exist. A test checks that
  every schema key is in exactly one of these places.
* **Which jobs exist.** The loss networks of each benchmark (:meth:`Plan.lossnets`), the
  wildcard values of its jobs (:meth:`Plan.jobs`), the prepared datasets and weight files
  they read (:meth:`Plan.prepared`, :meth:`Plan.weights_input`).

A rule's ``--config`` (its params) holds the stage's ``depends`` keys plus ``precision`` and,
where a loss network is used, its ``weights`` and ``weights_seed``. Its ``--settings`` hold
``device``, ``weights_dir`` and the stage's ``settings`` keys (and the CLI adds the rule's
``--threads``). A settings param is a :class:`Setting`: Snakemake records only params it can
represent (built-in types) for its rerun trigger, so a :class:`Setting` never reruns a job,
while the shell command still receives its JSON.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from workflow.archs import (
    ARCHS,
    CUSTOM,
    PIXEL,
    PIXEL_METRICS,
    PIXEL_MIN_SIDE,
    SSL_PRESETS,
    LossNet,
    UnknownLossNetError,
    all_lossnets,
    known_archs,
    missing_extra,
    pixel_lossnets,
    register_custom,
    weights_file_in,
    weights_filename,
    weights_url,
)

__all__ = ["BENCHMARKS", "DAG_KEYS", "DATASETS", "STAGES", "ConfigError", "Plan", "Setting",
           "Stage", "as_json", "complete_config", "load_config", "merge_config", "read_config_file",
           "show_config"]

SCHEMAS = Path(__file__).resolve().parent / "schemas"
_SCHEMA_BASE = "https://lossnet-bench.invalid/schemas/"

BENCHMARKS = ("similarity", "super_resolution", "delineation", "autoencoder", "adaptation",
              "probes", "calibration")
DATASETS = ("bapps", "coco", "sr_test", "roads", "svhn", "stl10",
            "tid2013", "kadid10k", "csiq", "nights")
# datasets without a download (their host serves no stable archive): data.paths only
NO_DOWNLOAD = ("csiq",)
# PIXEL ("pixel", from archs): the arch of the pixel baselines pixel/<metric>, and the
# autoencoder's net id of its pixel-MSE baseline. The benchmarks that score pixel baselines:
PIXEL_BENCHMARKS = ("similarity", "probes")
# keys of those benchmarks that only concern a loss network's features: not in a pixel job's
# config (changing them reruns no pixel baseline); pixel distances are float64 (no precision)
PIXEL_INDEPENDENT = ("comparisons", "channel_norm", "normalize")


class ConfigError(ValueError):
    """A config that fails its schema; the message names the key and what is allowed."""


class Setting:
    """A rule param that reaches the shell command as compact JSON (``{params.x:q}``) but is
    not part of Snakemake's params rerun trigger, which records only params of built-in types
    (``persistence._serialize_param``). Use it for what changes how a job runs, never what
    it computes. ``Setting(d)[key]`` is ``d[key]`` rendered the same way."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self._text: str | None = None  # Snakemake formats each shell command three times

    def __getitem__(self, key: str) -> Setting:
        return Setting(self.value.get(key, "") if isinstance(self.value, Mapping)
                       else self.value[key])

    def __str__(self) -> str:
        if self._text is None:
            self._text = self.value if isinstance(self.value, str) else as_json(self.value)
        return self._text

    def __repr__(self) -> str:
        return f"Setting({self.value!r})"


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One stage (rule) of a benchmark.

    ``depends``: keys of the benchmark's config section (dotted for nested ones) that change
    the stage's numbers. ``settings``: keys that change only how it runs. ``lossnet``: the
    stage builds a loss network, so its weights are part of what the result depends on.
    ``torch``: the stage computes with torch, so its precision is too: ``precision`` for a
    stage that trains, ``scoring_precision`` for one that ``scores`` (a metric or a model).
    """

    depends: tuple[str, ...]
    settings: tuple[str, ...] = ()
    lossnet: bool = True
    torch: bool = True
    scores: bool = False


STAGES: dict[str, dict[str, Stage]] = {
    "similarity": {
        "score": Stage(("comparisons", "channel_norm", "normalize", "image_size",
                        "twoafc_subsets", "jnd_subsets", "bootstrap.resamples", "bootstrap.seed",
                        "bootstrap.level"), settings=("batch_size",), scores=True),
    },
    "super_resolution": {
        "train": Stage(("iterations", "batch_size", "lr", "eval_every", "val_images", "normalize",
                        "blur_sigma", "crop_size", "seed"),
                       settings=("checkpoint_every", "log_every", "data_on_device",
                                 "eval_batch_size", "compile", "target_cache")),
        "eval": Stage(("blur_sigma", "image_size", "test_sets", "test_limit", "protocols"),
                      lossnet=False, scores=True),
    },
    "delineation": {
        "train": Stage(("seed", "epochs", "batch_size", "crop_size", "lr", "feature_weight",
                        "normalize", "threshold", "select_passes", "eval_every_epochs",
                        "tile_margin", "max_tiles.train", "max_tiles.valid"),
                       settings=("tile_size", "inference_batch", "data_on_device")),
        "eval": Stage(("threshold", "tolerance", "passes", "tile_margin", "reference_size",
                       "max_tiles.test", "max_tiles.valid"),
                      settings=("tile_size", "inference_batch"), lossnet=False, scores=True),
    },
    "autoencoder": {
        "train": Stage(("seed", "val_fraction", "train.epochs", "train.patience",
                        "train.batch_size", "train.lr", "train.normalize", "train.code_size",
                        "train.max_images"),
                       settings=("eval_batch_size", "train.checkpoint_every")),
        "encode": Stage(("seed", "encode.max_train_images", "encode.max_test_images"),
                        settings=("encode.batch_size",), lossnet=False, scores=True),
        # lossnet: the scores' weights_id is the loss network's (the codes depend on it)
        "mlp": Stage(("seed", "val_fraction", "mlp.hidden", "mlp.epochs", "mlp.patience",
                      "mlp.batch_size", "mlp.lr"), settings=("mlp.checkpoint_every",)),
    },
    "adaptation": {
        "rankings": Stage(("rankings", "ranking_seed"), lossnet=False, torch=False),
        "triplets": Stage(("triplet_seed", "val_fraction", "split_seed", "train_images",
                           "val_triplets", "test_triplets"), lossnet=False, torch=False),
        "train": Stage(("comparisons", "channel_norm", "seed", "normalize", "image_size",
                        "batch_size", "epochs_constant", "epochs_decay", "lr", "betas",
                        "dropout", "sync_weight"),
                       settings=("eval_batch_size", "eval_every_epochs")),
        "evaluate": Stage(("comparisons", "channel_norm", "normalize", "image_size",
                           "eval_datasets", "bapps", "bapps_2afc_subsets", "bapps_jnd_subsets"),
                          settings=("eval_batch_size",), scores=True),
        # adaptation.adapt_net: one (comparison, ranking) metric's own fine-tuned backbone
        "train_net": Stage(("seed", "normalize", "image_size", "batch_size", "epochs_constant",
                            "epochs_decay", "lr", "betas", "dropout", "sync_weight",
                            "adapt_net.lr"),
                           settings=("eval_batch_size", "eval_every_epochs")),
        "evaluate_net": Stage(("normalize", "image_size", "eval_datasets", "bapps",
                               "bapps_2afc_subsets", "bapps_jnd_subsets"),
                              settings=("eval_batch_size",), scores=True),
    },
    "probes": {
        "images": Stage(("images", "seed", "image_size"), lossnet=False, torch=False),
        "score": Stage(("comparisons", "channel_norm", "normalize", "image_size", "images"),
                       scores=True),
    },
    "calibration": {
        "train": Stage(("comparisons", "channel_norm", "seed", "normalize", "image_size",
                        "train_subsets", "train_limit", "batch_size", "epochs_constant",
                        "epochs_decay", "lr", "betas", "dropout")),
        "evaluate": Stage(("comparisons", "channel_norm", "normalize", "image_size",
                           "bapps_2afc_subsets", "bapps_jnd_subsets"),
                          settings=("eval_batch_size",), scores=True),
        # the lpips package's lin weights (the file is the rule's input)
        "shipped": Stage(("normalize", "image_size", "bapps_2afc_subsets", "bapps_jnd_subsets"),
                         settings=("eval_batch_size",), scores=True),
        # calibration.variants tune / scratch: the lin recipe with the backbone trained too
        # (scratch: its config carries no weights, stage_config), scored by evaluate_backbone
        "tune": Stage(("comparisons", "channel_norm", "seed", "normalize", "image_size",
                       "train_subsets", "train_limit", "batch_size", "epochs_constant",
                       "epochs_decay", "lr", "betas", "dropout", "clamp_backbone_1x1")),
        "scratch": Stage(("comparisons", "channel_norm", "seed", "normalize", "image_size",
                          "train_subsets", "train_limit", "batch_size", "epochs_constant",
                          "epochs_decay", "lr", "betas", "dropout", "clamp_backbone_1x1")),
        "evaluate_backbone": Stage(("comparisons", "channel_norm", "normalize", "image_size",
                                    "bapps_2afc_subsets", "bapps_jnd_subsets"),
                                   settings=("eval_batch_size",), scores=True),
    },
}

# Keys that choose which jobs exist (the DAG), not what a job computes.
# Benchmarks that train models fused per group (config <benchmark>.fuse): the key fields of
# one fused job (Plan.fused_groups)
FUSED_BY: dict[str, tuple[str, ...]] = {"super_resolution": ("arch", "scale"),
                                        "delineation": ("arch",),
                                        "autoencoder": ("arch", "dataset")}

DAG_KEYS: dict[str, tuple[str, ...]] = {
    "similarity": ("lossnets", "lpips_sets", "pixel_baselines", "datasets"),
    "super_resolution": ("lossnets", "lpips_sets", "scales", "runs", "fuse"),
    "delineation": ("lossnets", "runs", "fuse"),
    "autoencoder": ("lossnets", "lpips_sets", "pixel_baseline", "datasets", "runs", "fuse"),
    "adaptation": ("lossnets", "runs", "adapt_net.enabled", "adapt_net.comparisons",
                   "adapt_net.rankings"),
    "probes": ("lossnets", "pixel_baselines"),
    "calibration": ("lossnets", "runs", "shipped_weights", "variants"),
}

# The prepared datasets each benchmark reads (adaptation's depend on its config: datasets()).
BENCHMARK_DATASETS: dict[str, tuple[str, ...]] = {
    "similarity": ("bapps", "tid2013", "kadid10k", "csiq", "nights"),  # similarity.datasets
    "super_resolution": ("coco", "sr_test"),
    "delineation": ("roads",),
    "autoencoder": ("svhn", "stl10"),
    "adaptation": ("svhn", "stl10", "bapps"),
    "probes": (),
    "calibration": ("bapps",),
}

# The lpips package's name of each architecture it ships lin weights for (weights/v0.1/<name>.pth)
LPIPS_SHIPPED = {"alexnet": "alex", "vgg16": "vgg", "squeezenet1_1": "squeeze"}


# Keys of the similarity section that only some of its datasets use: absent from the other
# datasets' job configs, so changing them reruns only the jobs they concern (a job's config
# names its dataset; adding a dataset to similarity.datasets reruns no existing job).
SIMILARITY_DATASET_KEYS: dict[str, tuple[str, ...]] = {
    "image_size": ("bapps",), "twoafc_subsets": ("bapps",), "jnd_subsets": ("bapps",),
    "bootstrap": ("tid2013", "kadid10k", "csiq", "nights"),
}


# ----------------------------------------------------------------------------- the config


def _load_yaml(text: str) -> Any:
    """YAML with libyaml's C parser where PyYAML has it (several times faster)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@cache
def _schemas() -> tuple[dict[str, Any], Any]:
    """The root schema and a registry of every schema file (for their relative ``$ref``s)."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry()
    root: dict[str, Any] = {}
    for path in sorted(SCHEMAS.glob("*.schema.yaml")):
        schema = _load_yaml(path.read_text())
        schema["$id"] = _SCHEMA_BASE + path.name
        registry = registry.with_resource(schema["$id"], Resource.from_contents(
            schema, default_specification=DRAFT202012))
        if path.name == "config.schema.yaml":
            root = schema
    return root, registry


def _resolve(schema: Mapping[str, Any], base: str) -> tuple[Mapping[str, Any], str]:
    """Follow ``$ref`` (to another file or into ``$defs``); returns the schema and its file."""
    _, registry = _schemas()
    while "$ref" in schema:
        ref = schema["$ref"]
        target, _, pointer = ref.partition("#")
        uri = _SCHEMA_BASE + target if target else base
        resolved: Any = registry.contents(uri)
        for part in [p for p in pointer.split("/") if p]:
            resolved = resolved[part]
        # sibling keywords of a $ref (default, description) take precedence
        schema = {**resolved, **{k: v for k, v in schema.items() if k != "$ref"}}
        base = uri
    return schema, base


def _fill_defaults(data: dict[str, Any], schema: Mapping[str, Any], base: str) -> None:
    for key, sub in schema.get("properties", {}).items():
        sub, sub_base = _resolve(sub, base)
        if key not in data:
            if "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
            elif "properties" in sub:
                data[key] = {}
        if isinstance(data.get(key), dict) and "properties" in sub:
            _fill_defaults(data[key], sub, sub_base)


def _walk_schema(path: Iterable[Any]) -> tuple[Mapping[str, Any], str] | None:
    """The (resolved) schema of the config item at ``path`` and its file, or None."""
    root, _ = _schemas()
    schema, base = _resolve(root, root["$id"])
    for part in path:
        options = [schema, *schema.get("oneOf", ()), *schema.get("anyOf", ())]
        nxt = None
        for opt in options:
            opt, ob = _resolve(opt, base)
            if isinstance(part, int) and isinstance(opt.get("items"), Mapping):
                nxt = (opt["items"], ob)
            elif not isinstance(part, int) and part in opt.get("properties", {}):
                nxt = (opt["properties"][part], ob)
            elif not isinstance(part, int) and isinstance(opt.get("additionalProperties"),
                                                          Mapping):
                nxt = (opt["additionalProperties"], ob)
            if nxt:
                break
        if nxt is None:
            return None
        schema, base = _resolve(*nxt)
    return schema, base


def _word(value: Any) -> str:
    """A schema value as the user would write it in YAML."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string",
               "boolean": "true or false", "null": "null", "array": "a list",
               "object": "a mapping"}


def _summary(schema: Mapping[str, Any], base: str, top: bool = True) -> str:
    """What a schema accepts, in a few words: the enum values, the type and its bounds, the
    alternatives of a oneOf/anyOf; a nested schema's own ``description`` where it has one."""
    schema, base = _resolve(schema, base)
    if not top and "description" in schema:
        return str(schema["description"])
    if "const" in schema:
        return _word(schema["const"])
    if "enum" in schema:
        values = list(dict.fromkeys(_word(v) for v in schema["enum"]))
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    alternatives = schema.get("oneOf") or schema.get("anyOf")
    if alternatives:
        return " or ".join(_summary(a, base, top=False) for a in alternatives)
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    if not types:
        return "any value"
    bounds = " and ".join(f"{op} {schema[k]}" for k, op in (
        ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
        if k in schema)
    words = []
    for t in sorted(types, key=lambda t: t != "null"):
        word = _TYPE_WORDS.get(t, t)
        if t in ("integer", "number") and bounds:
            word += " " + bounds
        elif t == "string" and "pattern" in schema:
            word += f" matching {schema['pattern']}"
        elif t == "string" and schema.get("minLength") == 1:
            word = "a non-empty string"
        elif t == "array" and isinstance(schema.get("items"), Mapping):
            word += f" of ({_summary(schema['items'], base, top=False)})"
        words.append(word)
    return " or ".join(words)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _dotted(path: Iterable[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _deepest(error: Any) -> Any:
    """The sub-error of a oneOf/anyOf that explains it: the alternative that got furthest into
    the value (a list checked item by item beats "is not 'all'"); the error itself when every
    alternative failed on the value's shape alone."""
    while error.validator in ("oneOf", "anyOf") and error.context:
        best = max(error.context, key=lambda c: (len(c.relative_path),
                                                 c.validator not in ("type", "const", "enum")))
        if not best.relative_path and best.validator in ("type", "const", "enum"):
            break
        error = best
    return error


def _explain(error: Any) -> list[str]:
    """One schema error as one or two lines: the config key, what is wrong, what is valid,
    and the key's description; never the schema itself."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = sorted(error.schema.get("properties", {}))
        lines = []
        for key in [k for k in error.instance if k not in known]:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            lines.append(f"config key {_dotted([*path, key])}: {key!r} was unexpected "
                         f"({hint}valid keys: {', '.join(known)})")
        if lines:
            return lines
    error = _deepest(error)
    path = list(error.absolute_path)
    where = _dotted(path) or "(top level)"
    if error.validator in ("pattern", "oneOf", "anyOf", "enum", "const"):
        problem = f"{_short(error.instance)} is not valid"
    else:
        problem = error.message
    found = _walk_schema(path)
    line = f"config key {where}: {problem}"
    if "propertyNames" in error.schema_path and found:
        line = (f"config key {_dotted([*path, error.instance])}: {error.instance!r} is not a "
                f"valid key here; valid: keys matching {error.schema.get('pattern', '?')}")
    elif found:
        # a list item's own description (a loss network id...) says it best
        line += f"; valid: {_summary(*found, top=not path or not isinstance(path[-1], int))}"
    lines = [line]
    # the description of the nearest key (not list item) on the path that has one
    for end in range(len(path), 0, -1):
        if isinstance(path[end - 1], int):
            continue
        key = _walk_schema(path[:end])
        if key and key[0].get("description"):
            text = " ".join(str(key[0]["description"]).split())
            lines.append(f"  ({_dotted(path[:end])}: {text})")
            break
    return lines


def _validate(config: Mapping[str, Any]) -> None:
    import jsonschema

    root, registry = _schemas()
    validator = jsonschema.Draft202012Validator(root, registry=registry)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [line for e in errors[:10] for line in _explain(e)]
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ConfigError("the config does not fit workflow/schemas/config.schema.yaml:\n  "
                          + "\n  ".join(lines) + more)


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill every missing key with its schema default, in place, and validate the result
    (one pass: a default never hides a wrong key or value of the user's, and a broken
    default fails here too)."""
    root, _ = _schemas()
    _fill_defaults(config, root, root["$id"])
    _validate(config)
    try:
        register_custom(config["lossnets"]["custom"])
    except UnknownLossNetError as e:
        raise ConfigError(str(e)) from None
    _check_weights_paths(config)
    return config


def _check_weights_paths(config: Mapping[str, Any]) -> None:
    """Every ``lossnets.weights_paths`` entry names an architecture of the registry and a file
    (checked when the DAG is built, not in the job that would read it)."""
    for arch, path in config["lossnets"]["weights_paths"].items():
        if arch not in known_archs():
            raise ConfigError(
                f"config key lossnets.weights_paths: {arch!r} (file {path}) is not an "
                f"architecture of the registry; valid names: {', '.join(known_archs())}")
        if not str(path).strip():
            raise ConfigError(f"config key lossnets.weights_paths.{arch}: the path is empty; "
                              f"give the state_dict file, or remove the entry")


def merge_config(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Nested update, as Snakemake merges ``--configfile`` files and ``--config`` values."""
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            merge_config(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    """One config file as a dict; a file that cannot be read, is not YAML, or is not a
    mapping fails with a :class:`ConfigError` naming the file and, for YAML, the line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(path, text, e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of config keys "
                          f"(key: value lines), not a {type(data).__name__}")
    return data


def _yaml_error(path: Path, text: str, error: Any) -> str:
    """A YAML parser error as one line: file, line and column, the problem, the line's text."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, cmark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and cmark is not None and mark is not None and cmark.line != mark.line:
        problem += f" ({context} on line {cmark.line + 1})"
    elif context:
        problem += f" ({context})"
    if mark is None:
        return f"config file {path} is not valid YAML: {problem}"
    lines = text.splitlines()
    raw = lines[mark.line] if mark.line < len(lines) else ""
    if "\t" in raw[:mark.column + 1]:
        problem += " (a tab: YAML indents with spaces only)"
    shown = raw.strip()
    return (f"config file {path}, line {mark.line + 1}, column {mark.column + 1}: not valid "
            f"YAML: {problem}" + (f": {shown[:80]}" if shown else ""))


def load_config(*files: str | Path, overrides: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """Merge config files (later ones win) and ``overrides``, then :func:`complete_config`."""
    config: dict[str, Any] = {}
    for f in files:
        merge_config(config, read_config_file(f))
    merge_config(config, overrides or {})
    return complete_config(config)


def show_config(configfiles: list[Path] | None = None) -> dict[str, Any]:
    """Print the complete config as Snakemake sees it: ``config.yaml`` (when in the current
    folder) with ``configfiles`` merged on top, every default filled in, as YAML."""
    import yaml

    base = [Path("config.yaml")] if Path("config.yaml").exists() else []
    config = load_config(*base, *(configfiles or []))
    print(yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100), end="")
    return config


def as_json(obj: Any) -> str:
    """Compact, key-sorted JSON: a rule param (pass it with ``{params.x:q}``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _get(section: Mapping[str, Any], dotted: str) -> Any:
    value: Any = section
    for part in dotted.split("."):
        value = value[part]
    return value


def _pick(section: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The dotted ``keys`` of ``section`` as a nested dict (``train.lr`` -> {train: {lr}})."""
    out: dict[str, Any] = {}
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(_get(section, dotted))
    return out


# ----------------------------------------------------------------------------- the plan


def _wildcard(wildcards: Any, name: str) -> str | None:
    try:
        return str(getattr(wildcards, name))
    except AttributeError:
        return None


class Plan:
    """Everything the rules of one (complete) config need.

    ``Plan(config)`` completes ``config`` in place (validation and defaults), so the
    Snakefile's ``config`` and the plan agree.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = complete_config(config)
        self.res = str(self.config["resources_dir"])
        self.out = str(self.config["results_dir"])
        self._cross_check()

    def _cross_check(self) -> None:
        """What the schema cannot say, checked at DAG build instead of when a job runs."""
        from workflow.datasets.sources import COCO_SIZE

        for b in self.enabled():
            self.lossnets(b)  # an unknown loss network id is named with its config key
        self._check_extras()
        for a in self.imagenet_archs():
            if a in CUSTOM and not CUSTOM[a].weights_file:
                raise ConfigError(
                    f"config key lossnets.custom.{a}: weights is imagenet but the entry has "
                    f"no weights_url (torchvision's {CUSTOM[a].weights or 'weights enum'}.url);"
                    f" add it, give lossnets.weights_paths.{a}, or set lossnets.weights: random")
        own = self.own_weights_dir()
        missing = [weights_filename(a) for a in self.imagenet_archs()
                   if own and not Path(self.weight_file(a)).is_file()]
        if missing:
            raise ConfigError(
                f"config key lossnets.weights_dir ({own}): {len(missing)} ImageNet file(s) "
                f"missing: {', '.join(missing)}; put torchvision's files there (e.g. "
                f"torchvision.models.alexnet(weights='IMAGENET1K_V1') fills the torch hub "
                f"cache), set lossnets.weights: random, or unset lossnets.weights_dir to fetch "
                f"them into {self.res}/weights with `snakemake --cores 1 download_weights`")
        sim = self.config["similarity"]
        if "similarity" in self.enabled() and "bapps" in sim["datasets"]:
            size = int(sim["image_size"])
            small = [f"{n.id} needs {PIXEL_MIN_SIDE[n.layer]}" for n in self.lossnets("similarity")
                     if n.is_pixel and size < PIXEL_MIN_SIDE.get(n.layer, 1)]
            if small:
                raise ConfigError(f"config key similarity.image_size ({size}) is too small for "
                                  f"{', '.join(small)} px on BAPPS; raise it or drop those "
                                  f"metrics from similarity.pixel_baselines")
        sr = self.config["super_resolution"]
        if "super_resolution" in self.enabled():
            size = int(sr["crop_size"] or COCO_SIZE)
            if size > COCO_SIZE:
                raise ConfigError(f"config key super_resolution.crop_size ({size}) exceeds the "
                                  f"{COCO_SIZE}px prepared COCO images; use at most {COCO_SIZE}")
            for scale in sr["scales"]:
                if size // int(scale) < 5:  # the 9x9 reflection-padded head needs 5 pixels
                    raise ConfigError(
                        f"config key super_resolution.crop_size ({size}) gives {size // scale}px "
                        f"inputs at x{scale} (super_resolution.scales); use a crop of at least "
                        f"{5 * int(scale)} or drop that scale")

    def _check_extras(self) -> None:
        """A loss network whose library is an optional extra that is not installed (the
        self-supervised presets: timm, extra ``ssl``) stops the DAG build, naming the extra."""
        where = {a: f"{b}.lossnets" for b in reversed(self.enabled()) for a in self.archs(b)}
        where.update({a: "lossnets.archs" for a in self.config["lossnets"]["archs"]})
        for arch, key in where.items():
            why = None if arch == PIXEL else missing_extra(arch)
            if why:
                raise ConfigError(f"config key {key}: {why}")

    # ------------------------------------------------------------------ loss networks

    def grid(self) -> list[LossNet]:
        """The global grid of config key ``lossnets`` (archs x layers, without LPIPS sets)."""
        ln = self.config["lossnets"]
        return all_lossnets(ln["archs"], [str(x) for x in ln["layers"]])

    def lpips_sets(self) -> list[LossNet]:
        return [LossNet(a, "lpips") for a in self.config["lossnets"]["lpips_sets"]]

    def lossnets(self, benchmark: str) -> list[LossNet]:
        """Loss networks of one benchmark, from ``<benchmark>.lossnets``.

        ``all`` is the grid, ``lpips_sets`` the LPIPS sets, or a list of ``arch/layer`` ids.
        Where the section has an ``lpips_sets`` switch it adds the LPIPS sets; in adaptation
        and probes (no switch) ``all`` includes them; delineation has none. Where the section
        has ``pixel_baselines`` (the benchmarks of :data:`PIXEL_BENCHMARKS`) it adds
        ``pixel/<metric>`` for each; elsewhere a ``pixel/...`` id is refused.
        """
        sec = self.config[benchmark]
        chosen = sec["lossnets"]
        try:
            if chosen == "all":
                nets = self.grid()
            elif chosen == "lpips_sets":
                nets = self.lpips_sets()
            else:
                nets = [LossNet.parse(str(s)) for s in chosen]
        except UnknownLossNetError as e:
            raise UnknownLossNetError(f"config key {benchmark}.lossnets: {e}") from None
        if sec.get("lpips_sets", chosen == "all"
                   and benchmark in ("adaptation", "probes", "calibration")):
            nets += self.lpips_sets()
        pixel = [n.id for n in nets if n.is_pixel]
        if pixel and benchmark not in PIXEL_BENCHMARKS:
            raise UnknownLossNetError(
                f"config key {benchmark}.lossnets: {', '.join(pixel)} are pixel baselines, "
                f"which only {' and '.join(PIXEL_BENCHMARKS)} score; remove them")
        nets += pixel_lossnets(sec.get("pixel_baselines", ()))
        return list(dict.fromkeys(nets))

    @staticmethod
    def layer_wildcard(benchmark: str) -> str:
        """The ``{layer}`` wildcard's regex in a benchmark's rules: the study's layers and
        ``lpips``, and the pixel metrics where the benchmark scores pixel baselines."""
        layers = ["[1-4]", "lpips"]
        if benchmark in PIXEL_BENCHMARKS:
            layers += sorted(PIXEL_METRICS, key=len, reverse=True)
        return "|".join(layers)

    def archs(self, benchmark: str) -> list[str]:
        return list(dict.fromkeys(n.arch for n in self.lossnets(benchmark)))

    def weights(self, arch: str) -> str:
        """``imagenet`` | ``random`` | a state_dict path, for one architecture."""
        ln = self.config["lossnets"]
        return str(ln["weights_paths"].get(arch, ln["weights"]))

    def weights_input(self, arch: str | None) -> list[str]:
        """The file ``arch``'s weights are read from, as a rule input (none for ``random``)."""
        if arch is None or arch == PIXEL:
            return []
        w = self.weights(arch)
        if w == "imagenet":
            return [self.weight_file(arch)] + ([_ancient(self.weight_marker(arch))]
                                               if self.own_weights_dir() else [])
        return [] if w == "random" else [w]

    def weights_dir(self) -> str:
        """Where the ImageNet files are read from: config ``lossnets.weights_dir`` (``~``
        expanded; e.g. a torch hub cache, only read) or ``{resources_dir}/weights``."""
        own = self.own_weights_dir()
        return own or f"{self.res}/weights"

    def own_weights_dir(self) -> str | None:
        d = self.config["lossnets"]["weights_dir"]
        return os.path.expanduser(str(d)).rstrip("/") or "/" if d else None

    def weight_file(self, arch: str) -> str:
        """The ImageNet file of ``arch`` that jobs read (in a ``lossnets.weights_dir``, a
        self-supervised preset's file may be in the Hugging Face hub cache layout)."""
        own = self.own_weights_dir()
        if own and arch in SSL_PRESETS:
            return str(weights_file_in(arch, own))
        return f"{self.weights_dir()}/{weights_filename(arch)}"

    def weight_marker(self, arch: str) -> str:
        """With ``lossnets.weights_dir``: the record that ``download_weights`` verified the
        user's file (kept in resources_dir: the user's folder is never written)."""
        return f"{self.res}/weights/verified/{weights_filename(arch)}.json"

    def weight_targets(self, archs: Iterable[str] | None = None) -> list[str]:
        """What ``download_weights`` makes: the files, or (``lossnets.weights_dir``) the
        records of their verification."""
        archs = self.weight_archs() if archs is None else archs
        mark = self.weight_marker if self.own_weights_dir() else self.weight_file
        return [mark(a) for a in archs]

    def imagenet_archs(self) -> list[str]:
        """Architectures whose weights are ``imagenet``: the grid's, the LPIPS sets' and those
        of every enabled benchmark's loss networks (a benchmark may name one outside the
        grid; its weights are fetched too)."""
        ln = self.config["lossnets"]
        used = [a for b in self.enabled() for a in self.archs(b) if a != PIXEL]
        archs = dict.fromkeys([*ln["archs"], *ln["lpips_sets"], *used])
        return [a for a in archs if self.weights(a) == "imagenet"]

    def weight_archs(self) -> list[str]:
        """What ``download_weights`` fetches: the imagenet archs, or all 14 when there are none
        (``snakemake download_weights`` with ``weights: random`` still fills the folder)."""
        own = self.own_weights_dir()
        present = [a for a in ARCHS if own and Path(own, weights_filename(a)).is_file()]
        return self.imagenet_archs() or present or list(ARCHS)

    def weight_files(self) -> list[str]:
        """The ImageNet files of :meth:`weight_archs` (with ``lossnets.weights_dir``: the
        user's files, the inputs of ``download_weights``)."""
        return [self.weight_file(a) for a in self.weight_archs()]

    def custom_param(self) -> str:
        """The ``lossnets.custom`` entries among :meth:`weight_archs`, as JSON (the download
        job registers them)."""
        custom = self.config["lossnets"]["custom"]
        return as_json({a: custom[a] for a in self.weight_archs() if a in custom})

    def weight_urls(self) -> list[str]:
        return [weights_url(a) for a in self.weight_archs()]

    # ------------------------------------------------------------------ jobs

    def jobs(self, benchmark: str) -> list[dict[str, Any]]:
        """The wildcard values of every job whose scores the benchmark gathers."""
        sec = self.config[benchmark]
        nets = self.lossnets(benchmark)
        runs = range(int(sec.get("runs", 1)))
        if benchmark == "similarity":
            return [{"arch": a, "dataset": d} for a in self.archs(benchmark)
                    for d in sec["datasets"]]
        if benchmark == "super_resolution":
            return [{"arch": n.arch, "layer": n.layer, "scale": s, "run": r}
                    for n in nets for s in sec["scales"] for r in runs]
        if benchmark in ("delineation", "adaptation", "calibration"):
            return [{"arch": n.arch, "layer": n.layer, "run": r} for n in nets for r in runs]
        if benchmark == "autoencoder":
            ids = [n.id for n in nets] + ([PIXEL] if sec["pixel_baseline"] else [])
            return [{"net": i, "dataset": d, "run": r}
                    for i in ids for d in sec["datasets"] for r in runs]
        if benchmark == "probes":
            return [{"arch": n.arch, "layer": n.layer} for n in nets]
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")

    def shipped_lin(self) -> list[dict[str, str]]:
        """The calibration's jobs that score the lpips package's lin weights (config
        ``calibration.shipped_weights``): the LPIPS sets of ``calibration.lossnets`` the
        package ships weights for, each with its file."""
        folder = self.config["calibration"]["shipped_weights"]
        if not folder:
            return []
        folder = os.path.expanduser(str(folder)).rstrip("/")
        return [{"arch": n.arch, "layer": n.layer, "file": f"{folder}/{LPIPS_SHIPPED[n.arch]}.pth"}
                for n in self.lossnets("calibration")
                if n.layer == "lpips" and n.arch in LPIPS_SHIPPED]

    def adapt_net_jobs(self) -> list[dict[str, Any]]:
        """The adapted-net jobs (config ``adaptation.adapt_net``; none unless ``enabled``):
        :meth:`jobs` of adaptation x ``comparison`` (``adapt_net.comparisons``), ``norm``
        (``norm`` / ``raw``: ``adaptation.channel_norm``) x ``ranking`` (the first
        ``adapt_net.rankings``, default all)."""
        sec = self.config["adaptation"]
        an = sec["adapt_net"]
        if not an["enabled"]:
            return []
        count = int(sec["rankings"]) if an["rankings"] is None else min(int(an["rankings"]),
                                                                      int(sec["rankings"]))
        return [{**j, "comparison": c, "norm": "norm" if n else "raw", "ranking": r}
                for j in self.jobs("adaptation") for c in an["comparisons"]
                for n in sec["channel_norm"] for r in range(count)]

    def calibration_jobs(self, variants: Iterable[str] = ("tune", "scratch")
                         ) -> list[dict[str, Any]]:
        """The calibration jobs of the ``variants`` among ``calibration.variants`` (``lin``
        is :meth:`jobs`): :meth:`jobs` with ``variant``."""
        chosen = [v for v in self.config["calibration"]["variants"] if v in tuple(variants)]
        return [{**j, "variant": v} for v in chosen for j in self.jobs("calibration")]

    def fused_groups(self, benchmark: str) -> list[dict[str, Any]]:
        """The training jobs of a benchmark with fused training (``FUSED_BY``): with
        ``<benchmark>.fuse`` one per value of its key fields (SR: architecture and scale;
        delineation: architecture; autoencoder: architecture, or ``pixel``, and dataset),
        holding every layer and run of it (``members``: the :meth:`jobs` it trains, each with
        its ``arch``); without, one per model."""
        by = FUSED_BY[benchmark]
        fuse = bool(self.config[benchmark]["fuse"])
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for j in self.jobs(benchmark):
            j = {**j, "arch": j.get("arch") or j["net"].split("/")[0]}  # AE jobs name a net
            key = tuple(str(j[k]) for k in (by if fuse else j))
            groups.setdefault(key, []).append(j)
        return [{**{k: m[0][k] for k in by}, "members": m} for m in groups.values()]

    def fused_members(self, benchmark: str, folder: str, **key: Any) -> list[dict[str, Any]]:
        """The fused job of ``benchmark`` with key fields ``key`` (e.g. ``arch="alexnet",
        scale=4``): ``[{"net", "run", "dir"}]``, ``dir`` being ``folder`` (the model's own
        folder pattern, e.g. ``.../{arch}/{layer}/x{scale}/run{run}``) for each member."""
        for g in self.fused_groups(benchmark):
            if all(str(g[k]) == str(v) for k, v in key.items()):
                return [{"net": m.get("net") or f"{m['arch']}/{m['layer']}", "run": m["run"],
                         "dir": folder.format(**m)} for m in g["members"]]
        raise ValueError(f"no {benchmark} job trains "
                         + ", ".join(f"{k} {v}" for k, v in key.items()))

    def fused_members_param(self, benchmark: str, folder: str) -> Callable[[Any], Setting]:
        """A fused rule's param: the job's members with their folders (``folder``: the
        model's folder pattern), as a Setting (paths are no rerun trigger)."""
        by = FUSED_BY[benchmark]
        return lambda wc: Setting(self.fused_members(benchmark, folder,
                                                     **{k: getattr(wc, k) for k in by}))

    def fused_nets_param(self, benchmark: str) -> Callable[[Any], str]:
        """A fused rule's param: which models the job trains (a rerun trigger: a new member
        joins the job)."""
        by = FUSED_BY[benchmark]
        return lambda wc: " ".join(
            f"{m['net']}:{m['run']}"
            for m in self.fused_members(benchmark, "", **{k: getattr(wc, k) for k in by}))

    def fused_targets(self, benchmark: str, member: str, group: str) -> list[str]:
        """The files of ``benchmark`` the gather reads: with ``<benchmark>.fuse`` the fused
        jobs' ``group`` pattern (of the key fields: every member's rows), else each model's
        ``member`` pattern."""
        if self.config[benchmark]["fuse"]:
            return [group.format(**g) for g in self.fused_groups(benchmark)]
        return self.targets(member, benchmark)

    def ae_model_input(self, model: str, group: str) -> Callable[[Any], str]:
        """The fit_mlps rule's input of its autoencoder: the model file (``model``, a pattern
        of ``{net}``, ``{dataset}``, ``{run}``) without ``autoencoder.fuse``; with it, the
        listing the model's fused job writes last (``group``: ``{arch}``, ``{dataset}``)."""
        if not self.config["autoencoder"]["fuse"]:
            return lambda wc: model.format(net=wc.net, dataset=wc.dataset, run=wc.run)
        return lambda wc: group.format(arch=wc.net.split("/")[0], dataset=wc.dataset)

    def enabled(self) -> list[str]:
        return [b for b in BENCHMARKS if b in self.config["benchmarks"]]

    # ------------------------------------------------------------------ data

    def datasets(self, benchmark: str) -> list[str]:
        """The prepared datasets a benchmark reads, as configured."""
        sec = self.config[benchmark]
        if benchmark == "autoencoder":
            return list(sec["datasets"])
        if benchmark == "adaptation":
            return list(dict.fromkeys(["svhn", *sec["eval_datasets"]]
                                      + (["bapps"] if sec["bapps"] else [])))
        if benchmark == "similarity":
            missing = [d for d in sec["datasets"] if not self.obtainable(d)]
            if missing:
                raise ConfigError(
                    f"config key similarity.datasets: {', '.join(missing)} cannot be downloaded"
                    " (its publisher serves no stable archive): set data.paths."
                    f"{missing[0]} to the folder of your copy (docs/data.md) or remove it")
            return list(sec["datasets"])
        return list(BENCHMARK_DATASETS[benchmark])

    def needed_datasets(self) -> list[str]:
        """Datasets the enabled benchmarks read (what the ``download`` target fetches)."""
        return sorted({d for b in self.enabled() for d in self.datasets(b)})

    def prepared(self, dataset: str) -> str:
        """The manifest of a prepared dataset: the file rules depend on."""
        return f"{self.res}/prepared/{dataset}/manifest.json"

    def raw_ready(self, dataset: str) -> str:
        return f"{self.res}/raw/{dataset}/READY"

    def data_options(self, dataset: str, purpose: str) -> str:
        """``data.<dataset>`` as a rule param with only what ``purpose`` (synthesize |
        download | prepare) depends on: synthetic sizes reach synthesize only, pinned
        checksums download only, so resizing the fakes never re-prepares real data."""
        opts = copy.deepcopy(self.config["data"].get(dataset) or {})
        opts.pop("archive_limits", None)  # a setting: data_settings_param
        if purpose != "synthesize":
            opts.pop("synthetic", None)
        if purpose not in ("download", "link"):
            opts.pop("checksums", None)
        if purpose == "link":
            opts["folder"] = self.user_folder(dataset)
        return as_json(opts)

    def user_folder(self, dataset: str) -> str | None:
        """Config ``data.paths.<dataset>`` with ``~`` expanded: the user's own copy in its
        upstream layout, which the ``link_dataset`` rule uses instead of a download."""
        folder = self.config["data"]["paths"].get(dataset)
        return os.path.expanduser(str(folder)) if folder else None

    def linked_datasets(self) -> list[str]:
        return [d for d in DATASETS if self.user_folder(d)]

    def obtainable(self, dataset: str) -> bool:
        """Whether the data rules can make ``dataset``: a download, the synthetic twin or a
        ``data.paths`` folder (CSIQ has no download: ``NO_DOWNLOAD``)."""
        return (dataset not in NO_DOWNLOAD or self.config["data"]["source"] == "synthetic"
                or bool(self.user_folder(dataset)))

    def fingerprint_param(self) -> Callable[[Any], str]:
        """The link rule's rerun trigger: the paths, sizes and mtimes of the user folder's
        files that prepare reads (a stat of each when the DAG is built; nothing is read)."""
        from workflow.datasets.user_folders import fingerprint

        return lambda wildcards: fingerprint(wildcards.dataset,
                                             self.user_folder(wildcards.dataset))

    def mirror(self, name: str) -> str:
        return str(self.config["data"]["mirrors"].get(name, ""))

    @staticmethod
    def dataset_urls(name: str) -> list[str]:
        """The upstream URLs of a dataset (imports its module: only for download jobs)."""
        from workflow.datasets.registry import urls

        return urls(name)


    # ------------------------------------------------------------------ params

    def stage_config(self, benchmark: str, stage: str, arch: str | None = None,
                     dataset: str | None = None) -> dict[str, Any]:
        """What the stage's results depend on: its ``depends`` keys, ``precision`` and the
        loss network's ``weights`` / ``weights_seed`` (for a job of architecture ``arch``);
        a similarity job also names its ``dataset`` (default bapps) and keeps only the keys
        of :data:`SIMILARITY_DATASET_KEYS` that concern it."""
        spec = STAGES[benchmark][stage]
        cfg = _pick(self.config[benchmark], spec.depends)
        if spec.torch:
            cfg["precision"] = self.config["scoring_precision" if spec.scores else "precision"]
        if spec.lossnet and arch not in (None, PIXEL):
            cfg["weights"] = self.weights(arch)
            cfg["weights_seed"] = int(self.config["lossnets"]["seed"])
        if (benchmark, stage) == ("calibration", "scratch"):
            # a random initialisation whatever lossnets.weights says: they change nothing
            cfg.pop("weights", None)
            cfg.pop("weights_seed", None)
        if arch in CUSTOM:  # the job registers its own entry of lossnets.custom
            cfg["custom_lossnets"] = {arch: self.config["lossnets"]["custom"][arch]}
        if arch == PIXEL and benchmark in PIXEL_BENCHMARKS:
            # a pixel baseline computes on the images: no features, no autocast
            for key in (*PIXEL_INDEPENDENT, "precision"):
                cfg.pop(key, None)
        if benchmark == "similarity" and arch is not None:
            # one job per architecture scores exactly its own loss networks
            cfg["lossnets"] = [n.id for n in self.lossnets(benchmark) if n.arch == arch]
        if benchmark == "similarity":
            cfg["dataset"] = dataset = dataset or "bapps"
            for key, users in SIMILARITY_DATASET_KEYS.items():
                if dataset not in users:
                    cfg.pop(key, None)
        return cfg

    def stage_settings(self, benchmark: str, stage: str) -> dict[str, Any]:
        """How the stage runs: device, the weights folder and its ``settings`` keys (the
        rule's threads reach the command as ``--threads``)."""
        spec = STAGES[benchmark][stage]
        settings = {**_pick(self.config[benchmark], spec.settings),
                    "device": self.config["device"], "weights_dir": self.weights_dir()}
        if spec.torch and not spec.scores:  # a stage that trains (the harness reads it)
            settings["step_capture"] = self.config["step_capture"]
        return settings

    def config_param(self, benchmark: str, stage: str) -> Callable[[Any], str] | str:
        """A rule param: the stage's config as JSON. A function of the job's architecture
        where it depends on it (a loss network's weights, similarity's loss networks), else
        one string (Snakemake then has no function to call per job)."""
        spec = STAGES[benchmark][stage]
        if not spec.lossnet and benchmark != "similarity":
            return as_json(self.stage_config(benchmark, stage))

        def param(wildcards: Any) -> str:
            return as_json(self.stage_config(benchmark, stage, _job_arch(wildcards),
                                             _wildcard(wildcards, "dataset")))

        return param

    def settings_param(self, benchmark: str, stage: str, *folded: str) -> Setting:
        """A rule param that is never a rerun trigger: the stage's settings, merged with those
        of the stages ``folded`` into its command (one process running several stages)."""
        merged = self.stage_settings(benchmark, stage)
        for other in folded:
            for key, value in self.stage_settings(benchmark, other).items():
                both = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
                merged[key] = {**merged[key], **value} if both else value
        return Setting(merged)

    def weights_param(self) -> Callable[[Any], list[str]]:
        """A rule input function: the loss network's weights file of the job, if any."""
        return lambda wildcards: self.weights_input(_job_arch(wildcards))

    def mirror_param(self, name: str | None = None) -> Setting | Callable[[Any], Setting]:
        """The download mirror (config ``data.mirrors``) of ``name``, or of the job's
        ``{dataset}``, as a rule param that is never a rerun trigger: where the bytes come
        from, not what they are (the checksums decide that)."""
        if name is not None:
            return Setting(self.mirror(name))
        return lambda wildcards: Setting(self.mirror(wildcards.dataset))

    def data_settings_param(self) -> Callable[[Any], Setting]:
        """How the job's ``{dataset}`` is downloaded, as a rule param that is never a rerun
        trigger: the archive limits its extraction enforces (config
        ``data.<dataset>.archive_limits``); they refuse or allow, never change the bytes."""
        def param(wildcards: Any) -> Setting:
            limits = (self.config["data"].get(wildcards.dataset) or {}).get("archive_limits")
            return Setting({"archive_limits": limits} if limits else {})

        return param

    def targets(self, pattern: str, benchmark: str) -> list[str]:
        """``pattern`` (with ``{arch}``, ``{layer}``, ``{run}``... fields) for every job."""
        return [pattern.format(**job) for job in self.jobs(benchmark)]

    # ------------------------------------------------------------------ resources

    def threads(self, wanted: int) -> int:
        """A rule's ``threads``: ``wanted``, capped by ``max_threads`` when that is set."""
        cap = self.config.get("max_threads")
        return min(wanted, int(cap)) if cap else wanted

    def gpus(self, benchmark: str, stage: str) -> int:
        """The ``gpu`` resource of a stage's rule: 1 where the stage computes with torch
        (``STAGES``) and ``device`` can be a GPU (auto, cuda, cuda:N, mps), else 0. With it
        Snakemake runs at most ``--resources gpu=N`` such jobs at once (the Snakefile makes
        N = 1 the default of a local run) and the SLURM plugin asks for ``--gpus``."""
        if not STAGES[benchmark][stage].torch:
            return 0
        return 0 if str(self.config["device"]) == "cpu" else 1

    # ------------------------------------------------------------------ analysis

    def analysis_files(self) -> dict[str, list[str]]:
        """The declared outputs of the analysis rules (tables, figures)."""
        from workflow.analysis import FIGURE_FORMATS, FIGURES, TABLE_FORMATS, TABLES

        return {"tables": [f"{self.out}/analysis/{t}.{f}" for t in TABLES for f in TABLE_FORMATS],
                "figures": [f"{self.out}/figures/{g}.{f}" for g in FIGURES for f in FIGURE_FORMATS],
                # each figure's report caption: its finding, computed from the data
                "captions": [f"{self.out}/figures/{g}.rst" for g in FIGURES]}

    def analysis_params(self, what: str) -> str:
        """Params of the analysis rules: ``attributes`` sees the grid and the input sizes,
        ``tables`` the analysis section without the figure-only keys plus the config values
        the published numbers require (``published.config``), ``figures`` all of it."""
        an = self.config["analysis"]
        if what == "attributes":
            ln = self.config["lossnets"]
            grid = {n.id for n in [*self.grid(), *self.lpips_sets()]}
            extra = list(dict.fromkeys(n.id for b in self.enabled() for n in self.lossnets(b)
                                       if not n.is_pixel and n.id not in grid))
            custom = {a: ln["custom"][a] for a in dict.fromkeys(LossNet.parse(i).arch
                                                                  for i in extra) if a in CUSTOM}
            return as_json({"lossnets": {**{k: ln[k] for k in ("archs", "layers", "lpips_sets")},
                                         **({"extra": extra} if extra else {}),
                                         **({"custom": custom} if custom else {})},
                            "sizes": sorted({int(v) for v in an["input_sizes"].values()})})
        if what == "tables":
            # the published-vs-reproduced table also sees the config keys its numbers require
            from workflow.analysis import published

            keys = published.requirements(published.load())
            return as_json({**{k: v for k, v in an.items() if k not in FIGURE_ONLY_KEYS},
                            "published": {"config": published.config_values(self.config, keys)}})
        if what == "figures":
            return as_json(an)
        raise ValueError(f"unknown analysis step {what!r}")


# analysis keys only the figures read: editing them re-plots and recomputes no table
FIGURE_ONLY_KEYS = ("figures", "adaptation", "probes")


def _ancient(path: str) -> str:
    """``path`` as an input whose mtime Snakemake ignores (only its existence counts): the
    verification record of a ``lossnets.weights_dir`` file, which Snakemake touches when
    ``download_weights`` writes it; the user's file itself, a plain input, decides reruns."""
    try:
        from snakemake.io import ancient
    except ImportError:  # the plan outside Snakemake
        return path
    return ancient(path)


def _job_arch(wildcards: Any) -> str | None:
    arch = _wildcard(wildcards, "arch")
    if arch is not None:
        return arch
    net = _wildcard(wildcards, "net")
    if net is None or net == PIXEL:
        return net
    return net.split("/")[0]


def schema_leaves(benchmark: str) -> list[str]:
    """Every leaf key of a benchmark's section, dotted (for the completeness test)."""
    root, _ = _schemas()
    sub, base = _resolve(root["properties"][benchmark], root["$id"])

    def walk(s: Mapping[str, Any], b: str, prefix: str) -> list[str]:
        out = []
        for key, child in s.get("properties", {}).items():
            child, cb = _resolve(child, b)
            if "properties" in child:
                out += walk(child, cb, f"{prefix}{key}.")
            else:
                out.append(prefix + key)
        return out

    return walk(sub, base, "")
