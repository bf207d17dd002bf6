"""Fused autoencoder training (config ``autoencoder.fuse``): FusedAutoencoder against separate
ConvAutoencoders, a fused step against separate steps, the train_fused command against the
train command (batches, losses, per-member selection and early stopping, files), resuming
after a kill, finished members, and the plan / DAG with fuse on and off
(workflow.benchmarks.autoencoder_fused, workflow.models.autoencoder)."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
import yaml

from tests.snakemake_helpers import ROOT, snakemake
from tests.training_helpers import kill_at
from workflow import cli
from workflow.archs import LossNet
from workflow.benchmarks import autoencoder as bench
from workflow.benchmarks import autoencoder_fused as aef
from workflow.benchmarks.fused import member_name
from workflow.lossnets import build_extractor, feature_loss
from workflow.models.autoencoder import ConvAutoencoder, FusedAutoencoder
from workflow.plan import Plan, as_json
from workflow.training import load_model, make_adam

CPU = torch.device("cpu")
ARCH = "squeezenet1_1"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("size", [64, 96])
def test_fused_autoencoder_is_the_members_side_by_side(size):
    """fp64: codes and reconstructions of each member (own batch or a shared one) are the
    separate ConvAutoencoder's; the member state dicts round-trip."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(ConvAutoencoder(size, 16).double())
    fused = FusedAutoencoder.from_members(models)
    x = torch.rand(2, 2, 3, size, size, dtype=torch.float64)
    z, y, shared = fused.encode(x), fused(x), fused(x[0])
    assert z.shape == (2, 2, 16) and y.shape == (2, 2, 3, size, size)
    for i, m in enumerate(models):
        torch.testing.assert_close(z[i], m.encode(x[i]), atol=1e-12, rtol=0)
        torch.testing.assert_close(y[i], m(x[i]), atol=1e-12, rtol=0)
        torch.testing.assert_close(shared[i], m(x[0]), atol=1e-12, rtol=0)
        state = fused.member_state_dict(i)
        assert state.keys() == m.state_dict().keys()
        for k, v in m.state_dict().items():
            assert torch.equal(state[k], v), k
    with pytest.raises(ValueError, match="64x64"):
        FusedAutoencoder(64, k=2)(torch.rand(2, 1, 3, 96, 96))
    with pytest.raises(ValueError, match="one input and code size"):
        FusedAutoencoder.from_members([ConvAutoencoder(64), ConvAutoencoder(96)])


def _member_grads(fused: FusedAutoencoder, i: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in fused.named_parameters():
        n = p.shape[0] // fused.k
        out[name] = p.grad[i * n:(i + 1) * n]
    return out


def _steps(dtype: torch.dtype):
    """One Adam step of K=3 autoencoders (squeezenet1_1/1 run0, /2 run0, /2 run1: two layers
    of one arch sharing run 0's batch, and a second run with its own), alone (the single
    train's loss, :func:`feature_loss`) and fused (:func:`aef.member_losses`)."""
    nets = [LossNet.parse(f"{ARCH}/{i}") for i in (1, 2, 2)]
    runs, target_of = (0, 0, 1), [0, 0, 1]
    x = torch.rand(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    models = []
    for r in runs:
        torch.manual_seed(r)
        models.append(ConvAutoencoder(64, 16).to(dtype))
    fused = FusedAutoencoder.from_members(models)
    alone = {"loss": [], "grad": [], "weights": []}
    for m, net, t in zip(models, nets, target_of, strict=True):
        ext = build_extractor(ARCH, lossnets=[net], weights="random", normalize="none").to(dtype)
        opt = make_adam(m.parameters(), 1e-3, CPU)
        loss = feature_loss(ext, net.taps, m(x[t]), x[t])
        loss.backward()
        opt.step()
        alone["loss"].append(loss.detach())
        alone["grad"].append({k: p.grad.clone() for k, p in m.named_parameters()})
        alone["weights"].append({k: v.clone() for k, v in m.state_dict().items()})
    ext = build_extractor(ARCH, lossnets=nets, weights="random", normalize="none").to(dtype)
    opt = make_adam(fused.parameters(), 1e-3, CPU)
    losses = aef.member_losses(ext, nets, fused(x[target_of]), x, target_of)
    losses.sum().backward()
    opt.step()
    together = {"loss": list(losses.detach()), "grad": [_member_grads(fused, i) for i in range(3)],
                "weights": [fused.member_state_dict(i) for i in range(3)]}
    return alone, together


def test_a_fused_step_of_three_autoencoders_is_three_separate_steps():
    """fp64: losses, gradients and Adam-updated weights of the fused step are the separate
    steps' within 1e-10 (the same arithmetic in another order). fp32: losses and gradients
    within 1e-5; updated weights within 1e-5 wherever the exact gradient is at least 1e-6,
    within 2 lr elsewhere. Adam's first step moves a weight by lr * g / (|g| + eps), about
    +-lr whatever the size of g, so where the exact gradient is 0 or tiny (the bias of a
    convolution before BatchNorm has gradient 0) fp32 rounding picks the sign, alone as much
    as fused: the separate fp32 step itself is 6e-4 away from the exact one there."""
    alone, together = _steps(torch.float64)
    for i in range(3):
        torch.testing.assert_close(together["loss"][i], alone["loss"][i], atol=1e-10, rtol=0)
        for what in ("grad", "weights"):
            for k, v in together[what][i].items():
                torch.testing.assert_close(v, alone[what][i][k], atol=1e-10, rtol=0,
                                           msg=f"member {i} {what} {k}")
    assert alone["loss"][1] != alone["loss"][2]  # the third model had its own batch
    assert alone["loss"][0] != alone["loss"][1]  # and the first its own layer
    alone32, together32 = _steps(torch.float32)
    lr = 1e-3
    for i in range(3):
        torch.testing.assert_close(together32["loss"][i], alone32["loss"][i], atol=1e-5, rtol=0)
        for k, v in together32["grad"][i].items():
            torch.testing.assert_close(v, alone32["grad"][i][k], atol=1e-5, rtol=0, msg=k)
        checked = total = 0
        for k, v in together32["weights"][i].items():
            diff = (v - alone32["weights"][i][k]).abs()
            sure = alone["grad"][i][k].abs() >= 1e-6 if k in alone["grad"][i] else \
                torch.ones_like(diff, dtype=torch.bool)  # buffers: BatchNorm statistics
            assert float(torch.where(sure, diff, 0).max()) <= 1e-5, (i, k)
            assert float(diff.max()) <= 2 * lr + 1e-7, (i, k)
            checked, total = checked + int(sure.sum()), total + sure.numel()
        assert checked > 0.6 * total  # the 1e-5 bound covers most weights


def test_pixel_losses_are_each_members_mse():
    out = torch.rand(3, 2, 3, 8, 8)
    x = torch.rand(2, 2, 3, 8, 8)
    got = aef.member_losses(None, [None] * 3, out, x, [0, 1, 1])
    want = [torch.mean((out[i] - x[t]) ** 2) for i, t in enumerate([0, 1, 1])]
    torch.testing.assert_close(got, torch.stack(want), atol=0, rtol=0)


# ----------------------------------------------------------------------------- the command


def _argv(demo_plan, arch, **train):
    """--config / --settings of the train stage for ``arch`` (or pixel), on the CPU, fp32."""
    plan = demo_plan
    if train:
        config = copy.deepcopy(demo_plan.config)
        config["autoencoder"]["train"] |= train
        plan = Plan(config)
    config = {**plan.stage_config("autoencoder", "train", arch), "precision": "fp32"}
    settings = {**plan.stage_settings("autoencoder", "train"), "threads": 1, "device": "cpu"}
    return ["--config", as_json(config), "--settings", as_json(settings)]


def _fused(demo_plan, prepared, members, workdir, arch=ARCH, **train):
    return cli.run("autoencoder", "train_fused", [
        "--dataset", "svhn", "--members", json.dumps(members), *_argv(demo_plan, arch, **train),
        "--prepared", str(prepared("svhn")), "--workdir", str(workdir),
        "--out", str(workdir.parent / "models.json")])


def _alone(demo_plan, prepared, net, run, folder, arch=ARCH, **train):
    return cli.run("autoencoder", "train", [
        "--net", net, "--dataset", "svhn", "--run", str(run), *_argv(demo_plan, arch, **train),
        "--prepared", str(prepared("svhn")), "--workdir", str(folder / "train"),
        "--out", str(folder / "autoencoder.pt")])


def _state(path):
    ae, meta = bench.load_autoencoder(path)
    return ae.state_dict(), meta


class _Record:
    """The training batches and per-model losses of the fused and the single command."""

    def __init__(self, mp) -> None:
        self.batches, self.losses = [], []
        real_fused, real_inputs = aef.member_losses, bench.inputs

        def fused_(*a, **k):
            out = real_fused(*a, **k)
            if torch.is_grad_enabled():
                self.losses.append(out.detach())
            return out

        def inputs_(*a, **k):
            fn = real_inputs(*a, **k)

            def batch(idx):
                x = fn(idx)
                if torch.is_grad_enabled():
                    self.batches.append(x.clone())
                return x

            return batch

        mp.setattr(aef, "member_losses", fused_)
        mp.setattr(aef, "inputs", inputs_)
        mp.setattr(bench, "inputs", inputs_)
        real_loss = bench.reconstruction_loss

        def loss_(*a, **k):
            fn, ext = real_loss(*a, **k)

            def recorded(out, x):
                value = fn(out, x)
                if torch.is_grad_enabled():
                    self.losses.append(value.detach().reshape(1))
                return value

            return recorded, ext

        mp.setattr(bench, "reconstruction_loss", loss_)


MEMBERS = [(f"{ARCH}/1", 0), (f"{ARCH}/2", 0), (f"{ARCH}/2", 1)]
# 20 SVHN images: 16 / 4, batches of 8: 2 steps an epoch, 4 steps
SMALL = {"epochs": 2, "max_images": 20, "batch_size": 8}


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, demo_plan, prepared):
    """The three MEMBERS fused on SMALL draws, and each trained alone by the train command,
    with the batches and losses each saw."""
    root = tmp_path_factory.mktemp("aefused")
    members = [{"net": n, "run": r, "dir": str(root / f"m{i}")}
               for i, (n, r) in enumerate(MEMBERS)]
    with pytest.MonkeyPatch.context() as mp:
        rec = _Record(mp)
        listing = _fused(demo_plan, prepared, members, root / "group" / "train", **SMALL)
    alone = []
    for i, (net, run) in enumerate(MEMBERS):
        with pytest.MonkeyPatch.context() as mp:
            one = _Record(mp)
            meta = _alone(demo_plan, prepared, net, run, root / f"alone{i}", **SMALL)
        alone.append((meta, one))
    return root, members, listing, rec, alone


def test_fused_training_is_training_each_model_alone(fused_run):
    """Each member sees its batches of training alone bit for bit (two streams: runs 0 and 1),
    starts from the same weights (the same first loss within 1e-5), follows the same
    trajectory (losses within 1%, validation losses within 0.1%, reconstructions within
    2e-3), keeps its own selection, and its file holds train's meta."""
    root, members, listing, rec, alone = fused_run
    assert [m["trained_now"] for m in listing["members"]] == [True] * 3
    probe = rec.batches[0][:4]
    steps = 2 * SMALL["epochs"]
    assert len(rec.batches) == 2 * steps and len(rec.losses) == steps  # 2 streams a step
    for i, (meta, one) in enumerate(alone):
        stream = MEMBERS[i][1]
        assert len(one.batches) == steps
        for step in range(steps):
            assert torch.equal(rec.batches[2 * step + stream], one.batches[step]), (i, step)
        fused_losses = torch.stack([v[i] for v in rec.losses])
        torch.testing.assert_close(fused_losses[0], one.losses[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_losses, torch.cat(one.losses), rtol=1e-2, atol=0)
        fw, fm = _state(root / f"m{i}" / "autoencoder.pt")
        aw, am = _state(root / f"alone{i}" / "autoencoder.pt")
        same = ("size", "code_size", "net", "dataset", "run", "n_train", "n_val",
                "steps_per_epoch", "steps", "stop_reason", "best_epoch", "epochs_run",
                "weights_id", "precision", "key")
        assert {k: fm[k] for k in same} == {k: am[k] for k in same}
        assert fm["best_val_loss"] == pytest.approx(am["best_val_loss"], rel=1e-3)
        assert fm["fused_with"] == 3 and am == meta
        # single weights are no test after a few steps: Adam moves each by about +-lr a step
        # whatever its gradient, so fp32 rounding flips the small ones; the functions agree
        recon = [bench.load_autoencoder(p)[0](probe) for p in (
            root / f"m{i}" / "autoencoder.pt", root / f"alone{i}" / "autoencoder.pt")]
        torch.testing.assert_close(recon[0], recon[1], atol=2e-3, rtol=0)
        assert set(fw) == set(aw)
        best = load_model(root / f"m{i}" / "train" / "best.pt", {})
        assert best["member"] == member_name(*MEMBERS[i])
    assert not torch.equal(rec.batches[0], rec.batches[1])  # two data streams
    hist = (root / "group" / "train" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"eval_{member_name(n, r)}/val_loss" in hist for n, r in MEMBERS)


def test_fused_training_resumes_bit_exactly_after_a_kill(tmp_path, demo_plan, prepared,
                                                         fused_run, monkeypatch):
    root, members, *_ = fused_run
    mine = [{**m, "dir": str(tmp_path / f"m{i}")} for i, m in enumerate(members)]
    workdir = tmp_path / "group" / "train"
    restore = kill_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _fused(demo_plan, prepared, mine, workdir, **SMALL)  # a checkpoint an epoch
    assert torch.load(workdir / "last.pt", weights_only=True)["step"] == 2
    restore()
    _fused(demo_plan, prepared, mine, workdir, **SMALL)
    for i in range(3):
        resumed, rm = _state(tmp_path / f"m{i}" / "autoencoder.pt")
        straight, sm = _state(root / f"m{i}" / "autoencoder.pt")
        assert rm["resumed_from"] == 2 and sm["resumed_from"] is None
        assert rm["best_val_loss"] == sm["best_val_loss"]
        for k in straight:
            assert torch.equal(resumed[k], straight[k]), k
    ckpt = torch.load(workdir / "last.pt", weights_only=True)
    assert set(ckpt["key"]["members"]) == {member_name(n, r) for n, r in MEMBERS}
    assert ckpt["key"]["members"][f"{ARCH}/2 run1"]["job"] == {
        "net": f"{ARCH}/2", "dataset": "svhn", "run": 1}


def test_a_member_trained_under_its_key_is_not_trained_again(tmp_path, demo_plan, prepared,
                                                             fused_run, capsys):
    """The first member's file of the fused run and the second's of the train command (the
    same resume key) are kept; a new member (layer 3) is the group's only training."""
    root, members, *_ = fused_run
    mine = []
    for i, src in enumerate((root / "m0", root / "alone1")):
        (tmp_path / f"m{i}").mkdir()
        shutil.copy(src / "autoencoder.pt", tmp_path / f"m{i}")
        mine.append({**members[i], "dir": str(tmp_path / f"m{i}")})
    third = {"net": f"{ARCH}/3", "run": 0, "dir": str(tmp_path / "m2")}
    listing = _fused(demo_plan, prepared, [*mine, third], tmp_path / "group" / "train",
                     **SMALL)
    assert [m["trained_now"] for m in listing["members"]] == [False, False, True]
    assert capsys.readouterr().out.count("not training it again") == 2
    ckpt = torch.load(tmp_path / "group" / "train" / "last.pt", weights_only=True)
    assert set(ckpt["key"]["members"]) == {f"{ARCH}/3 run0"}
    assert _state(tmp_path / "m2" / "autoencoder.pt")[1]["fused_with"] == 1
    # another training config (epochs) is another key: all three train
    listing = _fused(demo_plan, prepared, [*mine, third], tmp_path / "g2" / "train",
                     **{**SMALL, "epochs": 1})
    assert [m["trained_now"] for m in listing["members"]] == [True] * 3


def test_each_member_stops_early_on_its_own(tmp_path, demo_plan, prepared, monkeypatch):
    """Two pixel-baseline runs fused, validation losses scripted per member (patience 2): run 0
    stops after epoch 4 (best epoch 2) and leaves the loss, run 1 trains the 5 epochs; each
    file equals the train command's under the same script (steps, stop reason, best epoch,
    weights of its best epoch)."""
    script = {0: [0.5, 0.2, 0.3, 0.4, 0.1], 1: [0.5, 0.4, 0.3, 0.2, 0.1]}
    train = {"epochs": 5, "patience": 2, "max_images": 10, "batch_size": 8}  # 1 step an epoch
    real = aef.member_losses
    evals, active_counts = [], []

    def scripted(extractor, nets, out, targets, target_of):
        if torch.is_grad_enabled():
            active_counts.append(out.shape[0])
            return real(extractor, nets, out, targets, target_of)
        evals.append(len(nets))
        epoch = len(evals) - 1
        runs = [0, 1] if len(nets) == 2 else [1]
        return torch.tensor([script[r][epoch] for r in runs])

    monkeypatch.setattr(aef, "member_losses", scripted)
    members = [{"net": "pixel", "run": r, "dir": str(tmp_path / f"run{r}")} for r in (0, 1)]
    _fused(demo_plan, prepared, members, tmp_path / "group" / "train", arch="pixel", **train)
    assert evals == [2, 2, 2, 2, 1]  # run 0 is not evaluated after it stopped
    assert active_counts == [2] * 4 + [1]  # nor in the loss
    for r in (0, 1):
        calls: list[int] = []

        def alone_loss(job, net, normalize, r=r, calls=calls):
            def loss(out, x):
                if torch.is_grad_enabled():
                    return torch.mean((out - x) ** 2)
                calls.append(1)
                return torch.tensor(script[r][len(calls) - 1])

            return loss, None

        monkeypatch.setattr(bench, "reconstruction_loss", alone_loss)
        _alone(demo_plan, prepared, "pixel", r, tmp_path / f"alone{r}", arch="pixel", **train)
        fw, fm = _state(tmp_path / f"run{r}" / "autoencoder.pt")
        aw, am = _state(tmp_path / f"alone{r}" / "autoencoder.pt")
        keys = ("steps", "stop_reason", "best_epoch", "best_val_loss", "epochs_run", "key")
        assert {k: fm[k] for k in keys} == {k: am[k] for k in keys}
        probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(r))
        recon = [bench.load_autoencoder(tmp_path / d / "autoencoder.pt")[0](probe)
                 for d in (f"run{r}", f"alone{r}")]
        torch.testing.assert_close(recon[0], recon[1], atol=2e-3, rtol=0)  # its best epoch's
    _, m0 = _state(tmp_path / "run0" / "autoencoder.pt")
    _, m1 = _state(tmp_path / "run1" / "autoencoder.pt")
    assert (m0["stop_reason"], m0["steps"], m0["best_epoch"]) == ("early_stop", 4, 2)
    assert (m1["stop_reason"], m1["steps"], m1["best_epoch"]) == ("max_steps", 5, 5)


def test_a_fused_job_of_two_architectures_is_refused(tmp_path, demo_plan, prepared):
    members = [{"net": f"{ARCH}/1", "run": 0, "dir": str(tmp_path / "a")},
               {"net": "pixel", "run": 0, "dir": str(tmp_path / "b")}]
    with pytest.raises(ValueError, match="one loss-network architecture"):
        _fused(demo_plan, prepared, members, tmp_path / "w")


# ----------------------------------------------------------------------------- plan and DAG


def test_the_plan_makes_one_training_job_per_architecture_and_dataset(demo_plan):
    config = copy.deepcopy(demo_plan.config)
    config["autoencoder"].update(lossnets=["alexnet/1", "alexnet/2", f"{ARCH}/2"], runs=2,
                                 datasets=["svhn", "stl10"], pixel_baseline=True)
    fused = Plan(config)
    groups = fused.fused_groups("autoencoder")
    assert [(g["arch"], g["dataset"], len(g["members"])) for g in groups] == [
        ("alexnet", "svhn", 4), ("alexnet", "stl10", 4), (ARCH, "svhn", 2), (ARCH, "stl10", 2),
        ("pixel", "svhn", 2), ("pixel", "stl10", 2)]
    folder = "R/{net}/{dataset}/run{run}"
    assert fused.fused_members("autoencoder", folder, arch="alexnet", dataset="stl10") == [
        {"net": "alexnet/1", "run": 0, "dir": "R/alexnet/1/stl10/run0"},
        {"net": "alexnet/1", "run": 1, "dir": "R/alexnet/1/stl10/run1"},
        {"net": "alexnet/2", "run": 0, "dir": "R/alexnet/2/stl10/run0"},
        {"net": "alexnet/2", "run": 1, "dir": "R/alexnet/2/stl10/run1"}]
    with pytest.raises(ValueError, match="no autoencoder job trains arch vgg16, dataset svhn"):
        fused.fused_members("autoencoder", "", arch="vgg16", dataset="svhn")

    class WC:
        net, dataset, run = "alexnet/2", "svhn", 1

    model, group = "R/{net}/{dataset}/run{run}/ae.pt", "R/{arch}/fused/{dataset}/models.json"
    assert fused.ae_model_input(model, group)(WC) == "R/alexnet/fused/svhn/models.json"
    config["autoencoder"]["fuse"] = False
    alone = Plan(config)
    assert [len(g["members"]) for g in alone.fused_groups("autoencoder")] == [1] * 16
    assert alone.ae_model_input(model, group)(WC) == "R/alexnet/2/svhn/run1/ae.pt"


def _dry_run(tmp_path, fuse: bool) -> tuple[dict[str, int], str]:
    cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    cfg["benchmarks"] = ["autoencoder"]
    cfg["autoencoder"].update(lossnets=["alexnet/1", "alexnet/2"], runs=2, datasets=["svhn"],
                              fuse=fuse)
    cfg.update(results_dir=str(tmp_path / "results"), resources_dir=str(tmp_path / "res"))
    path = tmp_path / f"fuse{fuse}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("autoencoder", "-n", "--cores", "1", "-p", "--configfile", str(path),
                     timeout=300)
    out = proc.stdout + proc.stderr
    m = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal\s+\d+", out, re.S)
    assert m, out[-3000:]
    return {rule: int(n) for rule, n in (line.split() for line in m.group(1).splitlines())}, out


def test_the_dag_with_fuse_on_and_off(tmp_path):
    """fuse: one train_autoencoder per architecture and dataset (alexnet: 2 layers x 2 runs;
    pixel: its 2 runs), a train_fused command each; fit_mlps per model either way. fuse
    false: one train_autoencoder per model."""
    jobs, out = _dry_run(tmp_path, True)
    assert jobs["train_autoencoder"] == 2 and jobs["fit_mlps"] == 6
    assert out.count("autoencoder train_fused") == 2 and "autoencoder train --net" not in out
    assert "alexnet/fused/svhn/models.json" in out and "pixel/fused/svhn/models.json" in out
    members = re.search(r"--members '(\[[^']*alexnet[^']*\])'", out)
    assert members and [(m["net"], m["run"]) for m in json.loads(members.group(1))] == [
        ("alexnet/1", 0), ("alexnet/1", 1), ("alexnet/2", 0), ("alexnet/2", 1)]
    assert "--model" in out and "alexnet/2/svhn/run1/autoencoder.pt" in out
    jobs, out = _dry_run(tmp_path, False)
    assert jobs["train_autoencoder"] == 6 and jobs["fit_mlps"] == 6
    assert "train_fused" not in out and out.count("autoencoder train --net") == 6


# ----------------------------------------------------------------------------- perf counts


def _train_flops(model, x, mapping=None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=mapping or {}) as fc:
        model(x).float().pow(2).mean().backward()
    return int(fc.get_total_flops())


def test_the_perf_flop_count_counts_grouped_convolutions_right():
    """perf autoencoder --fused-k: its convolution-backward formula is torch's for ungrouped
    (transposed) convolutions, and counts a FusedAutoencoder of 2 as exactly 2 autoencoders
    (torch's own formula counts the grouped backward's weight gradients 2 times too high)."""
    from workflow.perf.counts import conv_backward_flop

    mapping = {torch.ops.aten.convolution_backward: conv_backward_flop}
    one, x = ConvAutoencoder(64), torch.rand(1, 3, 64, 64)
    alone = _train_flops(one, x)
    assert _train_flops(one, x, mapping) == alone
    fused = FusedAutoencoder.from_members([ConvAutoencoder(64) for _ in range(2)])
    assert _train_flops(fused, x, mapping) == 2 * alone
    assert _train_flops(fused, x) > 2 * alone  # what the fix is for


def test_the_perf_fused_count_runs_the_benchmarks_steps():
    """perf autoencoder's count, 2 layers of squeezenet1_1 at batch 2: the fused job's step
    dispatches fewer ops per model than one model per job, and no more FLOPs (the shared
    input's loss-network pass runs once instead of twice)."""
    from workflow.perf.autoencoder import fused_counts

    r = fused_counts(ARCH, 2, "svhn", 2, "cpu")
    assert r["fused_ops"] < r["alone_ops"] and 0 < r["fused_gflop"] <= r["alone_gflop"]
