"""The planning module (workflow/plan.py): the complete config, the stage table, the jobs.

Config errors must stop before the DAG is built and name the key; every schema key has a
description and a default and is classified exactly once (what a result depends on, a
setting, or a DAG key); the module the rules import must not import torch or pandas.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.snakemake_helpers import ROOT, snakemake
from workflow.archs import UnknownLossNetError
from workflow.plan import (
    BENCHMARKS,
    DAG_KEYS,
    STAGES,
    ConfigError,
    Plan,
    _resolve,
    _schemas,
    complete_config,
    load_config,
    schema_leaves,
)


def _full() -> dict:
    return load_config(ROOT / "config.yaml")


# ----------------------------------------------------------------------------- schemas


def _walk(schema, base, path=""):
    """(dotted key, resolved schema) of every property, recursively through objects and the
    objects of lists (``analysis.scores[].name``)."""
    for key, sub in schema.get("properties", {}).items():
        sub, b = _resolve(sub, base)
        yield path + key, sub
        if "properties" in sub:
            yield from _walk(sub, b, f"{path}{key}.")
        items = sub.get("items")
        if isinstance(items, dict):
            items, ib = _resolve(items, b)
            yield from _walk(items, ib, f"{path}{key}[].")


def test_every_key_has_a_description_and_a_default():
    root, _ = _schemas()
    missing_desc, missing_default = [], []
    for key, sub in _walk(root, root["$id"]):
        if "description" not in sub:
            missing_desc.append(key)
        # (keys of list items have no default: the item as written is the whole value)
        if "default" not in sub and "properties" not in sub and "[]" not in key:
            missing_default.append(key)
    assert not missing_desc, f"keys without a description: {missing_desc}"
    assert not missing_default, f"keys without a default: {missing_default}"


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_key_is_classified_exactly_once(benchmark):
    """A key is what a stage's results depend on, a setting, or a DAG key: never unlisted
    (it would silently not rerun anything) and never a setting of one stage and a dependency
    of the same stage."""
    leaves = set(schema_leaves(benchmark))
    listed = set(DAG_KEYS[benchmark])
    for name, stage in STAGES[benchmark].items():
        assert not set(stage.depends) & set(stage.settings), (benchmark, name)
        assert not (set(stage.depends) | set(stage.settings)) & set(DAG_KEYS[benchmark])
        listed |= set(stage.depends) | set(stage.settings)
    assert listed == leaves, (f"unclassified: {sorted(leaves - listed)}, "
                              f"not in the schema: {sorted(listed - leaves)}")


def test_defaults_are_the_study_and_are_applied_once():
    cfg = complete_config({})
    assert cfg == _full()  # config.yaml sets only where things go
    assert cfg["super_resolution"]["iterations"] == 200_000
    assert cfg["autoencoder"]["train"]["patience"] == 10
    assert cfg["delineation"]["max_tiles"] == {"train": None, "valid": None, "test": None}
    # a user's value wins over the default, nested or not
    cfg = complete_config({"autoencoder": {"train": {"lr": 0.5}}})
    assert cfg["autoencoder"]["train"]["lr"] == 0.5
    assert cfg["autoencoder"]["train"]["epochs"] == 50


@pytest.mark.parametrize("config, words", [
    ({"presicion": "fp32"}, ["presicion", "was unexpected", "did you mean precision?"]),
    ({"precision": "fp16"}, ["precision", "fp16"]),
    ({"similarity": {"batchsize": 3}}, ["similarity", "batchsize"]),
    ({"autoencoder": {"train": {"lr": -1}}}, ["autoencoder.train.lr"]),
])
def test_a_bad_config_names_the_key(config, words):
    with pytest.raises(ConfigError) as e:
        complete_config(config)
    assert all(w in str(e.value) for w in words), str(e.value)


def _schema_file(name: str) -> dict:
    return yaml.safe_load((ROOT / "workflow" / "schemas" / f"{name}.schema.yaml").read_text())


def _config_error(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        complete_config(config)
    first, *lines = str(e.value).splitlines()
    assert first.startswith("the config does not fit"), first
    return [line.strip() for line in lines]


def test_an_unexpected_key_lists_the_valid_ones():
    lines = _config_error({"similarity": {"batch_sise": 3, "lpips_set": True}})
    valid = ", ".join(sorted(_schema_file("similarity")["properties"]))
    assert lines == [
        "config key similarity.batch_sise: 'batch_sise' was unexpected (did you mean "
        f"batch_size? valid keys: {valid})",
        "config key similarity.lpips_set: 'lpips_set' was unexpected (did you mean "
        f"lpips_sets? valid keys: {valid})"]


def test_a_bad_loss_network_id_says_what_an_id_looks_like():
    lines = _config_error({"similarity": {"lossnets": ["alexnet/2", "alexnet/5"]}})
    item = _schema_file("similarity")["properties"]["lossnets"]["oneOf"][1]["items"]
    assert "e.g. alexnet/2" in item["description"]
    assert lines == [
        f"config key similarity.lossnets[1]: 'alexnet/5' is not valid; valid: "
        f"{item['description']}",
        f"(similarity.lossnets: "
        f"{_schema_file('similarity')['properties']['lossnets']['description']})"]
    # a value that fits no alternative's shape: the alternatives, summarised
    lines = _config_error({"super_resolution": {"lossnets": "every"}})
    sr_item = _schema_file("super_resolution")["$defs"]["lossnets"]["oneOf"][1]["items"]
    assert lines[0] == ("config key super_resolution.lossnets: 'every' is not valid; valid: "
                        f"all or a list of ({sr_item['description']})")


@pytest.mark.parametrize("config, valid", [
    # enum values, as the schema lists them
    ({"precision": "fp16"}, "valid: one of " + ", ".join(
        _schema_file("config")["properties"]["precision"]["enum"])),
    # the type and its bound
    ({"similarity": {"image_size": "x"}}, "valid: an integer >= "
     f"{_schema_file('similarity')['properties']['image_size']['minimum']}"),
    # oneOf of null and an integer
    ({"delineation": {"max_tiles": {"train": "a"}}}, "valid: null or an integer >= 1"),
    # list items
    ({"benchmarks": ["similarity", "simi"]}, "config key benchmarks[1]: 'simi' is not valid; "
     "valid: one of " + ", ".join(BENCHMARKS)),
    ({"lossnets": {"weights_paths": {"alexnet": 3}}}, "config key lossnets.weights_paths.alexnet:"
     " 3 is not of type 'string'; valid: a string"),
])
def test_a_schema_error_says_what_is_valid(config, valid):
    lines = _config_error(config)
    assert len(lines) <= 2 and valid in lines[0], lines
    # the key's description, never the schema itself
    assert all("'type':" not in line and "{" not in line for line in lines), lines


def test_a_yaml_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("similarity:\n  batch_size: 3\n   lr: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == (f"config file {bad}, line 3, column 6: not valid YAML: mapping "
                            "values are not allowed in this context: lr: [1, 2")
    tab = tmp_path / "tab.yaml"
    tab.write_text("similarity:\n\tbatch_size: 3\n")
    with pytest.raises(ConfigError, match=rf"{tab}, line 2, column 1: .*a tab: YAML indents"):
        load_config(tab)
    listed = tmp_path / "list.yaml"
    listed.write_text("- device: cpu\n")
    with pytest.raises(ConfigError, match=rf"{listed}: the top level must be a mapping"):
        load_config(listed)
    with pytest.raises(ConfigError, match=r"missing\.yaml cannot be read"):
        load_config(tmp_path / "missing.yaml")


def test_snakemake_stops_on_a_bad_config_before_the_dag(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"similarity": {"batchsize": 3}}))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(path), check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "similarity" in out and "batchsize" in out, out[-2000:]


def test_snakemake_lint_is_clean():
    proc = snakemake("--lint", "--configfile", str(ROOT / "config" / "demo.yaml"), check=False,
                     timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ----------------------------------------------------------------------------- loss networks


def test_full_config_selects_the_study_grid():
    plan = Plan(_full())
    nets = plan.lossnets("similarity")
    assert len([n for n in nets if n.layer != "lpips" and not n.is_pixel]) == 56
    assert [n.id for n in nets if n.is_pixel] == [
        "pixel/l2", "pixel/ssim", "pixel/l1", "pixel/psnr", "pixel/ms_ssim", "pixel/gmsd",
        "pixel/vifp", "pixel/haarpsi"]
    assert {n.arch for n in nets if n.layer == "lpips"} == {"alexnet", "vgg16", "squeezenet1_1"}
    assert len(plan.lossnets("delineation")) == 56  # no LPIPS sets in delineation
    assert [n.id for n in plan.lossnets("adaptation")] == [
        "alexnet/lpips", "vgg16/lpips", "squeezenet1_1/lpips"]
    # 56 networks x 2 scales; 57 autoencoders (56 + pixel) x 2 datasets
    assert len(plan.jobs("super_resolution")) == 112
    # super_resolution.fuse: 28 jobs (14 architectures x 2 scales) train and score the 112
    groups = plan.fused_groups("super_resolution")
    assert len(groups) == 28 and sum(len(g["members"]) for g in groups) == 112
    targets = plan.fused_targets("super_resolution", "{arch}/{layer}/{scale}/{run}",
                                 "{arch}/{scale}")
    assert len(targets) == 28
    assert len(plan.jobs("autoencoder")) == 114


def test_unknown_arch_lists_known_ones():
    cfg = _full()
    cfg["similarity"]["lossnets"] = ["alexnett/2"]
    with pytest.raises(UnknownLossNetError) as e:
        Plan(cfg).lossnets("similarity")
    msg = str(e.value)
    assert "similarity.lossnets" in msg and "alexnett" in msg and "squeezenet1_1" in msg


def test_weights_inputs_follow_the_config(tmp_path):
    state = tmp_path / "mine.pth"
    cfg = load_config(ROOT / "config.yaml", overrides={
        "resources_dir": "R", "lossnets": {"weights_paths": {"vgg16": str(state)}}})
    plan = Plan(cfg)
    assert plan.weights_input("alexnet") == ["R/weights/alexnet-owt-7be5be79.pth"]
    assert plan.weights_input("vgg16") == [str(state)]
    assert plan.weights_input("pixel") == [] and "vgg16" not in plan.imagenet_archs()
    cfg["lossnets"]["weights"] = "random"
    assert Plan(cfg).weights_input("alexnet") == []


def test_scoring_stages_run_at_scoring_precision():
    """Scoring is fp32 by default (bf16 flips near-tied preferences); training keeps
    `precision` (bf16 autocast on CUDA under auto)."""
    plan = Plan(load_config(ROOT / "config.yaml"))
    scoring = {(b, s) for b, stages in STAGES.items() for s, spec in stages.items()
               if spec.torch and spec.scores}
    assert scoring == {("similarity", "score"), ("super_resolution", "eval"),
                       ("delineation", "eval"), ("autoencoder", "encode"),
                       ("adaptation", "evaluate"), ("adaptation", "evaluate_net"),
                       ("probes", "score"),
                       ("calibration", "evaluate"), ("calibration", "shipped"),
                       ("calibration", "evaluate_backbone")}
    for b, stages in STAGES.items():
        for s, spec in stages.items():
            if spec.torch:
                want = "fp32" if (b, s) in scoring else "auto"
                assert plan.stage_config(b, s, "alexnet")["precision"] == want, (b, s)
    cfg = load_config(ROOT / "config.yaml", overrides={"scoring_precision": "bf16"})
    assert Plan(cfg).stage_config("similarity", "score", "alexnet")["precision"] == "bf16"
    assert Plan(cfg).stage_config("super_resolution", "train", "alexnet")["precision"] == "auto"


def test_a_benchmark_network_outside_the_grid_gets_its_weights_fetched():
    cfg = load_config(ROOT / "config.yaml", overrides={
        "resources_dir": "R", "lossnets": {"archs": ["alexnet"]},
        "super_resolution": {"lossnets": ["vgg16/2"]}})
    plan = Plan(cfg)
    assert "R/weights/vgg16-397923af.pth" in plan.weight_files()
    assert plan.weights_input("vgg16") == ["R/weights/vgg16-397923af.pth"]


@pytest.mark.parametrize("sr, words", [
    ({"crop_size": 32, "scales": [4, 8]}, ["super_resolution.crop_size (32)", "4px inputs at x8",
                                           "at least 40"]),
    ({"crop_size": 300}, ["super_resolution.crop_size (300)", "288px"]),
])
def test_sr_crop_is_checked_against_the_scales_at_dag_build(sr, words):
    cfg = load_config(ROOT / "config.yaml", overrides={"super_resolution": sr})
    with pytest.raises(ConfigError) as e:
        Plan(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)
    cfg["benchmarks"] = ["similarity"]  # not run: not checked
    Plan(cfg)


# ----------------------------------------------------------------------------- params


def test_stage_params_hold_only_what_the_result_depends_on():
    plan = Plan(_full())
    train = plan.stage_config("super_resolution", "train", "alexnet")
    for setting in ("checkpoint_every", "log_every", "data_on_device", "eval_batch_size"):
        assert setting not in train
    assert train["lr"] == 0.001 and train["precision"] == "auto"
    assert train["weights"] == "imagenet" and train["weights_seed"] == 0
    evaluation = plan.stage_config("super_resolution", "eval", "alexnet")
    assert "weights" not in evaluation and "lr" not in evaluation  # the model is an input
    settings = plan.stage_settings("super_resolution", "train")
    assert settings["eval_batch_size"] == 8 and "threads" not in settings
    assert settings["weights_dir"] == "resources/weights" and settings["device"] == "auto"
    # nested keys keep their nesting
    ae = plan.stage_config("autoencoder", "train", "alexnet")
    assert ae["train"]["epochs"] == 50 and "checkpoint_every" not in ae["train"]
    assert "weights" not in plan.stage_config("autoencoder", "train", "pixel")


def test_similarity_job_depends_on_its_own_loss_networks_only():
    cfg = _full()
    before = {a: Plan(cfg).stage_config("similarity", "score", a) for a in ("alexnet", "vgg16")}
    cfg["similarity"]["lossnets"] = ["alexnet/2", "vgg16/3"]
    after = Plan(cfg).stage_config("similarity", "score", "vgg16")
    assert after["lossnets"] == ["vgg16/3", "vgg16/lpips"]
    assert before["vgg16"]["lossnets"] != after["lossnets"]
    assert {k: v for k, v in after.items() if k != "lossnets"} == \
        {k: v for k, v in before["vgg16"].items() if k != "lossnets"}


def test_settings_param_is_not_a_rerun_trigger():
    """Snakemake records only params of built-in types for its params trigger
    (persistence._serialize_param): a Setting is left out, yet the shell gets its JSON."""
    from snakemake.persistence import UNREPRESENTABLE, PersistenceBase

    plan = Plan(_full())
    setting = plan.settings_param("similarity", "score")
    assert PersistenceBase._serialize_param_builtin(None, setting) is UNREPRESENTABLE
    assert json.loads(str(setting)) == {"batch_size": 128, "device": "auto",
                                        "weights_dir": "resources/weights"}
    config = plan.config_param("similarity", "score")
    wildcards = type("W", (), {"arch": "alexnet"})()
    assert PersistenceBase._serialize_param_builtin(None, config(wildcards)) != UNREPRESENTABLE
    assert str(plan.mirror_param("weights")) == ""


def test_a_folded_rule_gets_the_settings_of_every_stage_it_runs():
    """fit_mlps runs the encode and the mlp stage, train_delineation train and eval: their
    --settings hold both stages' keys (nested sections merged), still never a trigger."""
    plan = Plan(_full())
    ae = plan.settings_param("autoencoder", "mlp", "encode").value
    assert ae == {"mlp": {"checkpoint_every": None}, "encode": {"batch_size": 1024},
                  "device": "auto", "weights_dir": "resources/weights",
                  "step_capture": "auto"}  # the mlp stage trains
    both = plan.settings_param("autoencoder", "train", "mlp").value
    assert both["train"] == {"checkpoint_every": None} and both["mlp"] == ae["mlp"]
    de = plan.settings_param("delineation", "train", "eval").value
    assert de.keys() == {"tile_size", "inference_batch", "data_on_device", "device",
                         "weights_dir", "step_capture"}
    assert plan.settings_param("delineation", "train").value == de  # eval adds no other key


def test_archive_limits_reach_the_download_as_a_setting_only():
    """Raising an archive limit reruns nothing: it is in no rule's params trigger, and the
    download command gets it through --settings."""
    from snakemake.persistence import UNREPRESENTABLE, PersistenceBase

    cfg = _full()
    cfg["data"]["stl10"]["archive_limits"]["max_members"] = 7
    plan = Plan(cfg)
    wildcards = type("W", (), {"dataset": "stl10"})()
    setting = plan.data_settings_param()(wildcards)
    assert PersistenceBase._serialize_param_builtin(None, setting) is UNREPRESENTABLE
    assert json.loads(str(setting)) == {"archive_limits": {
        "max_members": 7, "max_ratio": 100, "max_member_ratio": 200}}
    for purpose in ("download", "prepare", "synthesize"):
        assert "archive_limits" not in json.loads(plan.data_options("stl10", purpose))
    bapps = plan.data_settings_param()(type("W", (), {"dataset": "bapps"})())
    assert json.loads(str(bapps))["archive_limits"]["max_members"] == 5_000_000
    assert str(plan.data_settings_param()(type("W", (), {"dataset": "coco"})())) == "{}"


# ----------------------------------------------------------------------------- no torch


FAKE = """raise ImportError("{name} was imported while the DAG was built")\n"""


@pytest.fixture
def no_torch(tmp_path):
    """A PYTHONPATH folder whose torch and torchvision fail to import (pandas cannot be faked:
    Snakemake's SLURM plugin imports it)."""
    for name in ("torch", "torchvision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(FAKE.format(name=name))
    return tmp_path


def test_plan_imports_neither_torch_nor_pandas():
    code = ("import sys, workflow.plan as p; p.Plan(p.load_config('config.yaml')); "
            "bad = [m for m in ('torch', 'pandas', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_full_study_dag_builds_without_torch(no_torch, tmp_path):
    """`snakemake -n` of the full study with a torch that cannot be imported: only the
    planning module (and Snakemake) run while the DAG is built."""
    import os

    env_path = f"{no_torch}{os.pathsep}{ROOT}"
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--quiet", "rules",
           "--snakefile", str(ROOT / "Snakefile"), "--config",
           f"results_dir={tmp_path / 'out'}", f"resources_dir={tmp_path / 'res'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": env_path})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "train_sr" in out and "score_similarity" in out
    assert "eval_sr" not in out and "sr_model" not in out  # fused: scored in train_sr


# ----------------------------------------------------------------------------- similarity family


def _family(**similarity) -> Plan:
    return Plan(load_config(ROOT / "config" / "demo.yaml", overrides={
        "similarity": similarity, "benchmarks": ["similarity"]}))


def test_similarity_jobs_per_architecture_and_dataset():
    plan = _family(datasets=["bapps", "tid2013", "kadid10k", "nights"])
    archs = ["alexnet", "squeezenet1_1", "resnet18", "convnext_tiny", "swin_t", "pixel"]
    assert plan.jobs("similarity") == [{"arch": a, "dataset": d} for a in archs
                                       for d in ("bapps", "tid2013", "kadid10k", "nights")]
    assert plan.datasets("similarity") == ["bapps", "tid2013", "kadid10k", "nights"]
    assert plan.targets("R/{arch}/{dataset}.parquet", "similarity")[:2] == [
        "R/alexnet/bapps.parquet", "R/alexnet/tid2013.parquet"]
    assert _family(datasets=["bapps"]).jobs("similarity") == [
        {"arch": a, "dataset": "bapps"} for a in archs]
    pixel = [n.id for n in plan.lossnets("similarity") if n.is_pixel]
    assert pixel == [f"pixel/{m}" for m in ("l2", "ssim", "l1", "psnr", "ms_ssim", "gmsd",
                                            "vifp", "haarpsi")]


def test_a_new_dataset_reruns_no_bapps_job():
    """A job's config names its dataset and holds only the keys that concern it: adding a
    dataset leaves the BAPPS jobs' params as they were, and the bootstrap keys reach only
    the MOS and NIGHTS jobs (BAPPS's subsets and patch size only BAPPS's)."""
    before = _family(datasets=["bapps"])
    after = _family(datasets=["bapps", "tid2013", "nights"],
                    bootstrap={"resamples": 10, "seed": 0, "level": 0.95})
    for arch in ("alexnet", "pixel"):
        w = type("W", (), {"arch": arch, "dataset": "bapps"})()
        assert before.config_param("similarity", "score")(w) == \
            after.config_param("similarity", "score")(w)
    bapps = after.stage_config("similarity", "score", "alexnet", "bapps")
    tid = after.stage_config("similarity", "score", "alexnet", "tid2013")
    assert bapps["dataset"] == "bapps" and "bootstrap" not in bapps
    assert tid["dataset"] == "tid2013" and tid["bootstrap"]["resamples"] == 10
    assert not {"image_size", "twoafc_subsets", "jnd_subsets"} & set(tid)
    assert {k: v for k, v in tid.items() if k not in ("dataset", "bootstrap")} == \
        {k: v for k, v in bapps.items()
         if k not in ("dataset", "image_size", "twoafc_subsets", "jnd_subsets")}
    w = type("W", (), {"arch": "pixel", "dataset": "nights"})()
    nights = json.loads(after.config_param("similarity", "score")(w))
    assert nights["dataset"] == "nights" and "comparisons" not in nights


@pytest.mark.parametrize("size, metrics, words", [
    (16, ["ms_ssim"], "pixel/ms_ssim needs 21"),
    (32, ["l2", "vifp"], "pixel/vifp needs 41"),
])
def test_too_small_bapps_patches_for_a_pixel_metric_stop_the_dag(size, metrics, words):
    with pytest.raises(ConfigError) as e:
        _family(image_size=size, pixel_baselines=metrics)
    assert "config key similarity.image_size" in str(e.value) and words in str(e.value)
    _family(image_size=size, pixel_baselines=metrics, datasets=["tid2013"])  # no BAPPS: fine
    _family(image_size=64, pixel_baselines=metrics)  # 3 MS-SSIM scales on 64 px
