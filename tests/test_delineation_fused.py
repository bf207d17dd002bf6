"""Fused delineation training (workflow/benchmarks/delineation_fused.py, models/unet.FusedUNet):
the fused U-Net against its members, a fused step against separate steps, fused training
against training each U-Net alone (batches, losses, selection, scores), resume after a kill,
finished members not retrained, and the plan / DAG with delineation.fuse on and off."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import yaml
from torch.nn import functional as F

from tests.snakemake_helpers import ROOT, demo_args, snakemake
from tests.training_helpers import kill_at
from workflow import cli
from workflow.archs import LossNet
from workflow.benchmarks import delineation as bench
from workflow.benchmarks import delineation_fused as dlf
from workflow.benchmarks.fused import member_name
from workflow.models.unet import FusedUNet, RefinementUNet
from workflow.training import Trainer, load_model

SIZES = {"train": 6, "valid": 2, "test": 3, "size": 48}  # synthetic roads, 48 px tiles
TINY = {"epochs": 2, "batch_size": 4, "crop_size": 32, "tile_margin": 48, "reference_size": 32,
        "tolerance": 2, "passes": [1, 2]}
TINY_SETTINGS = {"tile_size": 112, "inference_batch": 4}  # one tile: 48 px fits in 112
ARCH = "squeezenet1_1"  # quick to build
CPU = torch.device("cpu")


def _members(seeds, dtype=torch.float32) -> list[RefinementUNet]:
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(RefinementUNet().to(dtype))
    return out


# ----------------------------------------------------------------------------- the fused U-Net


def test_the_fused_unet_is_its_members_side_by_side():
    members = _members((0, 1, 2))
    fused = FusedUNet.from_members(members)
    assert fused.net.up[3].out_channels == 3 and fused.net.down[0][0].in_channels == 12
    for i, m in enumerate(members):  # member state dicts in and out, exactly
        got = fused.member_state_dict(i)
        assert got.keys() == m.state_dict().keys()
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in got.items())
    x = torch.rand(3, 2, 4, 32, 32)
    for mode in (True, False):  # batch statistics (train) and running statistics (eval)
        fused.train(mode)
        for m in members:
            m.train(mode)
        with torch.no_grad():
            out = fused.logits(x)
            shared = fused(x[0])  # one batch for every member
        assert out.shape == (3, 2, 1, 32, 32)
        for i, m in enumerate(members):
            with torch.no_grad():
                torch.testing.assert_close(out[i], m.logits(x[i]), atol=1e-6, rtol=0)
                torch.testing.assert_close(shared[i], m(x[0]), atol=1e-6, rtol=0)
    # a training-mode forward updated each member's running statistics from its own batch
    assert not torch.equal(fused.member_state_dict(0)["up_norm.0.running_mean"],
                           fused.member_state_dict(1)["up_norm.0.running_mean"])
    # channels_last (the CUDA default): the per-member skip concatenation keeps its values
    fused.eval()
    cl = FusedUNet.from_members(members).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(cl(x[0].contiguous(memory_format=torch.channels_last)),
                                   fused(x[0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="3 members got 2"):
        fused.logits(x[:2])
    with pytest.raises(ValueError, match="12, H, W"):
        fused.net.logits(torch.rand(1, 4, 32, 32))


# ----------------------------------------------------------------------------- one step


def _member_grads(fused: FusedUNet, i: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in fused.net.named_parameters():
        n = p.shape[0] // fused.k
        out[name] = p.grad[i * n:(i + 1) * n]
    return out


def _steps(dtype: torch.dtype, weight: float):
    """One Adam step of K=3 U-Nets (squeezenet1_1/1 and /2 of run 0 sharing a batch,
    squeezenet1_1/2 of run 1 with its own), each alone (plain BCE + feature_loss, written
    out here) and fused (member_losses): losses, gradients, updated weights."""
    from workflow.lossnets import build_extractor, feature_loss
    from workflow.training import make_adam

    nets = [LossNet.parse(f"{ARCH}/{layer}") for layer in (1, 2, 2)]
    target_of = [0, 0, 1]
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 2, 3, 32, 32, generator=gen).to(dtype)  # two runs' batches, N = 2
    maps = (torch.rand(2, 2, 1, 32, 32, generator=gen) < 0.2).to(dtype)
    models = _members((0, 0, 1), dtype)
    fused = FusedUNet.from_members(models)
    # one loss network for all (eval mode: a tap's features do not depend on deeper layers)
    ext = build_extractor(ARCH, lossnets=nets, weights="random").to(dtype)
    alone = {"loss": [], "grad": [], "weights": []}
    for m, net, t in zip(models, nets, target_of, strict=True):
        opt = make_adam(m.parameters(), 1e-3, CPU)
        x = torch.cat([images[t], torch.zeros_like(images[t][:, :1])], 1)
        logits = m.logits(x)
        loss = (F.binary_cross_entropy_with_logits(logits, maps[t])
                + weight * feature_loss(ext, net.taps, torch.sigmoid(logits).expand(-1, 3, -1, -1),
                                        maps[t].expand(-1, 3, -1, -1)))
        loss.backward()
        opt.step()
        alone["loss"].append(loss.detach())
        alone["grad"].append({k: p.grad.clone() for k, p in m.named_parameters()})
        alone["weights"].append({k: v.clone() for k, v in m.state_dict().items()})
    opt = make_adam(fused.parameters(), 1e-3, CPU)
    losses = dlf.member_losses(fused, ext, [n.taps for n in nets], images, maps, target_of,
                               weight)
    losses.sum().backward()
    opt.step()
    together = {"loss": list(losses.detach()),
                "grad": [_member_grads(fused, i) for i in range(3)],
                "weights": [fused.member_state_dict(i) for i in range(3)]}
    return alone, together


# the biases a BatchNorm cancels: their exact gradient is zero, so fp32 leaves rounding noise
# (~1e-9) there, which Adam's first step (g / (|g| + 1e-8)) turns into an update of up to lr
CANCELLED = {*(f"down.{i}.0.bias" for i in range(4)), *(f"up.{i}.bias" for i in range(3))}


@pytest.mark.parametrize("weight", [0.01, 1.0])  # the study's, and a perceptual-heavy one
def test_a_fused_step_of_three_unets_is_three_separate_steps(weight):
    """fp64: losses, gradients and Adam-updated weights of the fused step are the separate
    steps' within 1e-10. fp32: losses and gradients within 1e-5, and every updated weight
    within 1e-5 but the seven biases a BatchNorm cancels (exact gradient zero, checked in
    fp64: their fp32 update is Adam's response to rounding noise, alone as fused, and does
    not change the U-Net's function)."""
    exact, together = _steps(torch.float64, weight)
    for i in range(3):
        torch.testing.assert_close(together["loss"][i], exact["loss"][i], atol=1e-10, rtol=0)
        for what in ("grad", "weights"):
            assert together[what][i].keys() >= exact[what][i].keys()
            for k, v in exact[what][i].items():
                torch.testing.assert_close(together[what][i][k], v, atol=1e-10, rtol=0,
                                           msg=f"fp64 member {i} {what} {k}")
        zero = {k for k, g in exact["grad"][i].items() if float(g.abs().max()) < 1e-12}
        assert zero == CANCELLED, zero
    assert exact["loss"][1] != exact["loss"][2]  # the third U-Net had its own batch
    assert exact["loss"][0] != exact["loss"][1]  # and the first its own tap
    alone, together = _steps(torch.float32, weight)
    for i in range(3):
        torch.testing.assert_close(together["loss"][i], alone["loss"][i], atol=1e-5, rtol=0)
        for k, v in alone["grad"][i].items():
            torch.testing.assert_close(together["grad"][i][k], v, atol=1e-5, rtol=0,
                                       msg=f"fp32 member {i} grad {k}")
        for k, v in alone["weights"][i].items():
            if k not in CANCELLED:
                torch.testing.assert_close(together["weights"][i][k], v, atol=1e-5, rtol=0,
                                           msg=f"fp32 member {i} weights {k}")


def test_member_losses_under_bf16_autocast_are_fp32_and_close():
    """The CUDA default (bf16 autocast), run on the CPU: the losses come out fp32, finite and
    within bf16 rounding of the fp32 ones."""
    from workflow.lossnets import build_extractor

    nets = [LossNet.parse(f"{ARCH}/{layer}") for layer in (1, 2)]
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(1, 2, 3, 32, 32, generator=gen)
    maps = (torch.rand(1, 2, 1, 32, 32, generator=gen) < 0.2).float()
    fused = FusedUNet.from_members(_members((0, 1)))
    ext = build_extractor(ARCH, lossnets=nets, weights="random")
    args = (fused, ext, [n.taps for n in nets], images, maps, [0, 0], 1.0)
    want = dlf.member_losses(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dlf.member_losses(*args)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, atol=0, rtol=3e-2)


# ----------------------------------------------------------------------------- training


def _configs(demo_plan, eval_over=None, **over):
    train = {**demo_plan.stage_config("delineation", "train", ARCH), "precision": "fp32",
             **{k: v for k, v in TINY.items() if k in ("epochs", "batch_size", "crop_size",
                                                       "tile_margin")}, **over}
    evaluate = {**demo_plan.stage_config("delineation", "eval", ARCH), "precision": "fp32",
                **{k: v for k, v in TINY.items() if k in ("tile_margin", "reference_size",
                                                          "tolerance", "passes")},
                **(eval_over or {})}
    settings = {**demo_plan.settings_param("delineation", "train", "eval").value,
                "threads": torch.get_num_threads(), **TINY_SETTINGS, "device": "cpu"}
    return train, evaluate, settings


def _fused(demo_plan, data, members, workdir, eval_over=None, **over):
    """The train_fused command (the rule's one process: train, then score each member)."""
    train, evaluate, settings = _configs(demo_plan, eval_over, **over)
    argv = ["--members", json.dumps(members), "--config", json.dumps(train),
            "--eval-config", json.dumps(evaluate), "--settings", json.dumps(settings),
            "--prepared", str(data), "--workdir", str(workdir),
            "--out", str(workdir.parent / "models.json"),
            "--scores", str(workdir.parent / "scores.parquet")]
    return cli.run("delineation", "train_fused", argv)


class _Record:
    """Wraps the benchmark's crops and losses: each training step's batches, the fused
    members' losses and each step's total loss."""

    def __init__(self, mp) -> None:
        self.batches, self.losses, self.totals = [], [], []
        real_crops, real_losses, real_step = bench.train_crops, dlf.member_losses, \
            Trainer.train_step

        def crops_(*a, **k):
            img, gt = real_crops(*a, **k)
            self.batches.append(img.clone())
            return img, gt

        def losses_(*a, **k):
            out = real_losses(*a, **k)
            self.losses.append(out.detach())
            return out

        def step_(trainer, step):
            real_step(trainer, step)
            self.totals.append(trainer._pending[-1][1])

        mp.setattr(bench, "train_crops", crops_)
        mp.setattr(dlf, "train_crops", crops_)
        mp.setattr(dlf, "member_losses", losses_)
        mp.setattr(Trainer, "train_step", step_)


def _weights(path) -> dict[str, torch.Tensor]:
    net = RefinementUNet()
    meta = load_model(path, {"model": net})
    return {**net.state_dict(), "_meta": meta}


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, prepared, demo_plan):
    """squeezenet1_1/1 run0 and squeezenet1_1/2 run1 trained fused (2 epochs of 2 steps) and
    scored; and each trained alone; with the batches and losses each saw."""
    root = tmp_path_factory.mktemp("dl_fused")
    data = prepared("roads", **SIZES)
    members = [{"net": f"{ARCH}/1", "run": 0, "dir": str(root / "a")},
               {"net": f"{ARCH}/2", "run": 1, "dir": str(root / "b")}]
    with pytest.MonkeyPatch.context() as mp:
        rec = _Record(mp)
        listing = _fused(demo_plan, data, members, root / "group" / "train")
    from workflow.job import Job

    train, _, settings = _configs(demo_plan)
    alone = []
    for m in members:  # `delineation train` (fuse: false), not scored: the test below scores
        folder = root / f"alone{m['run']}"
        with pytest.MonkeyPatch.context() as mp:
            one = _Record(mp)
            bench.train(Job.create(train, settings), train, m["net"], m["run"], {"roads": data},
                        folder / "train", folder / "model.pt")
        alone.append((folder, one))
    return root, data, members, listing, rec, alone


def test_fused_training_is_training_each_unet_alone(fused_run, demo_plan):
    """Each member sees the batches (tile order, crops, flips) it sees alone, bit for bit,
    starts from the same weights (the same first loss within 1e-5), follows the same
    trajectory, and keeps its own selection, meta and files."""
    root, data, members, listing, rec, alone = fused_run
    lr = _configs(demo_plan)[0]["lr"]
    assert [m["trained_now"] for m in listing["members"]] == [True, True]
    assert len(rec.losses) == 4 and len(rec.batches) == 4 * 2  # 2 steps x 2 epochs x 2 runs
    for i, (folder, one) in enumerate(alone):
        assert len(one.batches) == 4
        for step in range(4):
            assert torch.equal(rec.batches[2 * step + i], one.batches[step]), (i, step)
        fused_losses = torch.stack([v[i] for v in rec.losses])
        alone_losses = torch.stack(one.totals)
        torch.testing.assert_close(fused_losses[0], alone_losses[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_losses, alone_losses, atol=1e-4, rtol=0)
        fm = _weights(root / "ab"[i] / "train" / "final.pt")
        am = _weights(folder / "model.pt")
        f_meta, a_meta = fm.pop("_meta"), am.pop("_meta")
        for k in ("net", "run", "steps", "best_step", "steps_per_epoch", "train_tiles",
                  "valid_tiles", "weights_id", "key"):
            assert f_meta[k] == a_meta[k], k
        assert f_meta["best_valid_quality"] == pytest.approx(a_meta["best_valid_quality"],
                                                             abs=1e-3)
        assert f_meta["fused_with"] == 2 and f_meta["steps"] == 4
        # the same trajectory, up to fp32 rounding: all but the CANCELLED biases (noise-driven
        # Adam steps) and the running means of the BatchNorms after them (which average those
        # biases in at momentum 0.1). Adam moves an element whose gradient is about 0 by up to
        # lr a step whichever way fp32 rounding points it (summation order differs between a
        # grouped and a plain convolution, and with the thread count), so a few elements of a
        # weight may stray; a different trajectory would move most of them by ~lr.
        for k, v in am.items():
            if k in CANCELLED:
                continue
            if k.endswith("running_mean"):
                torch.testing.assert_close(fm[k], v, atol=1e-3, rtol=0,
                                           msg=lambda m, k=k: f"{k}: {m}")
                continue
            diff = (fm[k].double() - v.double()).abs()
            astray = int((diff > 2e-5).sum())
            assert astray <= max(1, diff.numel() // 1000), (k, astray, diff.numel())
            assert float(diff.max()) <= 2 * f_meta["steps"] * lr, (k, float(diff.max()))
        # its own selection in its own folder, and its own files
        assert load_model(root / "ab"[i] / "train" / "best.pt", {"model": RefinementUNet()}
                          )["member"] == member_name(members[i]["net"], members[i]["run"])
        for name in ("model.pt", "tiles.parquet", "scores.parquet"):
            assert (root / "ab"[i] / name).is_file(), name
    assert not torch.equal(rec.batches[0], rec.batches[1])  # two data streams
    hist = pd.read_csv(root / "group" / "train" / "metrics.csv")
    assert {f"eval_{ARCH}/1 run0/quality", f"eval_{ARCH}/2 run1/quality"} <= set(hist.columns)


def test_the_fused_job_scores_each_member_as_a_separate_eval_would(tmp_path, fused_run,
                                                                   demo_plan):
    """Each member's tiles.parquet and scores.parquet equal the separate eval command's on
    its model, and the group's scores.parquet holds exactly the members' rows."""
    root, data, members, *_ = fused_run
    _, evaluate, settings = _configs(demo_plan)
    keep = ["split", "variant", "metric", "value", "n", "arch", "layer", "run", "weights_id",
            "precision", "config_hash"]
    parts = []
    for i, m in enumerate(members):
        folder = root / "ab"[i]
        argv = ["--net", m["net"], "--run", str(m["run"]), "--config", json.dumps(evaluate),
                "--settings", json.dumps(settings), "--model", str(folder / "train" / "final.pt"),
                "--prepared", str(data), "--samples", str(tmp_path / "tiles.parquet"),
                "--scores", str(tmp_path / "scores.parquet")]
        separate = cli.run("delineation", "eval", argv)
        folded = pd.read_parquet(folder / "scores.parquet")
        pd.testing.assert_frame_equal(folded[keep], separate[keep])
        pd.testing.assert_frame_equal(pd.read_parquet(folder / "tiles.parquet"),
                                      pd.read_parquet(tmp_path / "tiles.parquet"))
        parts.append(folded)
    group = pd.read_parquet(root / "group" / "scores.parquet")
    assert set(zip(group["layer"], group["run"], strict=True)) == {("1", 0), ("2", 1)}
    pd.testing.assert_frame_equal(group[keep], pd.concat(parts, ignore_index=True)[keep])


def _train_only(demo_plan, data, members, workdir, **over):
    """train_fused without the scoring (what the resume tests need)."""
    from workflow.job import Job

    train, _, settings = _configs(demo_plan, **over)
    return dlf.train_fused(Job.create(train, settings), train, members, {"roads": data},
                           workdir, workdir.parent / "models.json")


def test_fused_training_resumes_bit_exactly_after_a_kill(tmp_path, demo_plan, fused_run,
                                                         monkeypatch):
    root, data, members, *_ = fused_run
    mine = [{**m, "dir": str(tmp_path / f"m{i}")} for i, m in enumerate(members)]
    workdir = tmp_path / "group" / "train"
    restore = kill_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _train_only(demo_plan, data, mine, workdir)  # a checkpoint every epoch (2 steps)
    assert torch.load(workdir / "last.pt", weights_only=True)["step"] == 2
    restore()
    _train_only(demo_plan, data, mine, workdir)
    for i in range(2):
        resumed = _weights(tmp_path / f"m{i}" / "train" / "final.pt")
        straight = _weights(root / "ab"[i] / "train" / "final.pt")
        assert resumed.pop("_meta")["resumed_from"] == 2
        straight.pop("_meta")
        for k in straight:
            assert torch.equal(resumed[k], straight[k]), k
        assert (load_model(tmp_path / f"m{i}" / "train" / "best.pt", {})["step"]
                == load_model(root / "ab"[i] / "train" / "best.pt", {})["step"])
    ckpt = torch.load(workdir / "last.pt", weights_only=True)
    assert set(ckpt["key"]["members"]) == {f"{ARCH}/1 run0", f"{ARCH}/2 run1"}
    assert ckpt["key"]["members"][f"{ARCH}/2 run1"]["job"] == {
        "net": f"{ARCH}/2", "run": 1, "n_train": SIZES["train"]}


def test_trained_members_are_not_trained_again(tmp_path, demo_plan, fused_run, capsys):
    """Member a has its fused train/final.pt, member b only the model.pt of `fuse: false`
    (`delineation train`), both under their exact keys; a third joins: only it trains, and
    the group's checkpoint is its alone. A member whose key changed (epochs) trains again."""
    root, data, members, _, _, alone = fused_run
    (tmp_path / "m0" / "train").mkdir(parents=True)
    shutil.copy(root / "a" / "train" / "final.pt", tmp_path / "m0" / "train")
    (tmp_path / "m1").mkdir()
    shutil.copy(alone[1][0] / "model.pt", tmp_path / "m1")
    third = {"net": f"{ARCH}/3", "run": 0, "dir": str(tmp_path / "m2")}
    mine = [{**members[0], "dir": str(tmp_path / "m0")},
            {**members[1], "dir": str(tmp_path / "m1")}, third]
    listing = _train_only(demo_plan, data, mine, tmp_path / "group" / "train")
    assert [m["trained_now"] for m in listing["members"]] == [False, False, True]
    assert capsys.readouterr().out.count("not training it again") == 2
    ckpt = torch.load(tmp_path / "group" / "train" / "last.pt", weights_only=True)
    assert set(ckpt["key"]["members"]) == {f"{ARCH}/3 run0"}
    # b's model.pt became its final.pt, unchanged
    b = _weights(tmp_path / "m1" / "train" / "final.pt")
    want = _weights(alone[1][0] / "model.pt")
    assert b.pop("_meta")["key"] == want.pop("_meta")["key"]
    assert all(torch.equal(b[k], want[k]) for k in want)
    listing = _train_only(demo_plan, data, mine[:1], tmp_path / "g2" / "train", epochs=1)
    assert [m["trained_now"] for m in listing["members"]] == [True]


def test_a_fused_job_of_two_architectures_is_refused(tmp_path, demo_plan, prepared):
    members = [{"net": f"{ARCH}/1", "run": 0, "dir": str(tmp_path / "a")},
               {"net": "alexnet/2", "run": 0, "dir": str(tmp_path / "b")}]
    with pytest.raises(ValueError, match="one loss-network architecture"):
        _train_only(demo_plan, prepared("roads", **SIZES), members, tmp_path / "w")


# ----------------------------------------------------------------------------- plan and DAG


def test_the_plan_makes_one_training_job_per_architecture(demo_plan):
    """fuse (default): one job per architecture holding its layers and runs, and the gather
    reads the groups' files; fuse false: one per U-Net, the gather reads each U-Net's."""
    import copy

    from workflow.plan import DAG_KEYS, Plan, load_config

    assert "fuse" in DAG_KEYS["delineation"] and demo_plan.config["delineation"]["fuse"]
    config = copy.deepcopy(demo_plan.config)
    config["delineation"].update(lossnets=["alexnet/1", "alexnet/2", "resnet18/2"], runs=2)
    fused = Plan(config)
    assert [(g["arch"], len(g["members"])) for g in fused.fused_groups("delineation")] == [
        ("alexnet", 4), ("resnet18", 2)]
    assert fused.fused_members("delineation", "R/{layer}/run{run}", arch="alexnet") == [
        {"net": "alexnet/1", "run": 0, "dir": "R/1/run0"},
        {"net": "alexnet/1", "run": 1, "dir": "R/1/run1"},
        {"net": "alexnet/2", "run": 0, "dir": "R/2/run0"},
        {"net": "alexnet/2", "run": 1, "dir": "R/2/run1"}]
    member, group = "R/{arch}/{layer}/run{run}/s", "R/{arch}/fused/s"
    assert fused.fused_targets("delineation", member, group) == [
        "R/alexnet/fused/s", "R/resnet18/fused/s"]
    with pytest.raises(ValueError, match="no delineation job trains arch vgg16"):
        fused.fused_members("delineation", "", arch="vgg16")
    config["delineation"]["fuse"] = False
    alone = Plan(config)
    assert [len(g["members"]) for g in alone.fused_groups("delineation")] == [1] * 6
    assert alone.jobs("delineation") == fused.jobs("delineation")
    assert alone.fused_targets("delineation", member, group) == alone.targets(member, "delineation")
    study = Plan(load_config(ROOT / "config.yaml"))  # 14 jobs train the study's 56 U-Nets
    assert [len(g["members"]) for g in study.fused_groups("delineation")] == [4] * 14


def _dry_run(tmp_path, fuse: bool) -> str:
    extra = tmp_path / f"fuse{fuse}.yaml"
    extra.write_text(yaml.safe_dump({"benchmarks": ["delineation"], "delineation": {
        "lossnets": ["alexnet/2", "alexnet/3", "resnet18/2"], "runs": 2, "fuse": fuse}}))
    args = demo_args(tmp_path)
    args.insert(2, str(extra))  # after config/demo.yaml: it wins
    proc = snakemake("delineation", "-n", "-p", "--cores", "1", *args, timeout=300)
    return proc.stdout + proc.stderr


def test_the_dag_with_fuse_on_and_off(tmp_path):
    """`snakemake -n`: with fuse one train_delineation per architecture, its members (layers
    x runs, each with its own folder) in the command; without, one per U-Net and run."""
    import re

    on = _dry_run(tmp_path, True)
    assert re.search(r"^train_delineation\s+2$", on, re.M), on[-2000:]
    res = tmp_path / "results" / "delineation"
    for arch in ("alexnet", "resnet18"):
        assert f"{res}/{arch}/fused/scores.parquet" in on
    cmds = [c for c in on.splitlines() if "delineation train_fused" in c]
    assert len(cmds) == 2 and not any("delineation train --net" in c for c in on.splitlines())
    members = {}
    for c in cmds:
        arg = re.search(r"--members '(\[.*?\])'", c).group(1)
        ms = json.loads(arg)
        members[ms[0]["net"].split("/")[0]] = [(m["net"], m["run"], m["dir"]) for m in ms]
    assert members["alexnet"] == [
        (f"alexnet/{layer}", run, f"{res}/alexnet/{layer}/run{run}")
        for layer in (2, 3) for run in (0, 1)]
    assert [m[:2] for m in members["resnet18"]] == [("resnet18/2", 0), ("resnet18/2", 1)]
    off = _dry_run(tmp_path, False)
    assert re.search(r"^train_delineation\s+6$", off, re.M), off[-2000:]
    assert "train_fused" not in off
    for arch, layer, run in [("alexnet", 2, 0), ("alexnet", 3, 1), ("resnet18", 2, 1)]:
        assert f"{res}/{arch}/{layer}/run{run}/scores.parquet" in off


# ----------------------------------------------------------------------------- perf counts


@pytest.mark.parametrize("transposed", [False, True])
def test_the_perf_flop_count_of_a_grouped_convolution_by_hand(transposed):
    """Forward + backward of a grouped (transposed) 4x4 convolution, stride 2, 2 groups of
    4 -> 2 channels: the forward's multiplies, and each gradient as many again."""
    from torch.utils.flop_counter import FlopCounterMode

    from workflow.perf.counts import conv_backward_flop

    conv = (torch.nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2) if transposed
            else torch.nn.Conv2d(8, 4, 4, stride=2, padding=1, groups=2))
    x = torch.rand(1, 8, 6, 6, requires_grad=True)
    # per input position (transposed: it scatters) or output position (it gathers): 16 taps
    # x the 16 connected channel pairs (2 groups x 4 x 2, half of the dense 8 x 4); 2 FLOPs
    # a multiply-add
    positions = 6 * 6 if transposed else 3 * 3
    forward = 2 * positions * 16 * (2 * 4 * 2)
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        conv(x).sum().backward()
    assert fc.get_total_flops() == 3 * forward


def test_the_perf_fused_count_runs_and_fusion_saves_ops():
    from workflow.perf import delineation as perf

    tiles = perf.random_tiles(2, 64)
    r = perf.fused_counts(ARCH, 2, tiles, crop=32, batch=2, steps=1, threads=1)
    assert r["k"] == 2 and r["fused_ops"] < r["alone_ops"]
    # one loss-network pass on the shared maps instead of two: fewer FLOPs per model-step
    assert 0 < r["fused_flops"] < r["alone_flops"]
    md = perf.fused_markdown([r], 32, 2, 1)
    assert f"| {ARCH} | 2 |" in md and md.count("\n") == 4
