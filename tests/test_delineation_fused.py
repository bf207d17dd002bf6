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

from workflow import cli
from workflow.archs import LossNet
from workflow.benchmarks import delineation as bench
from workflow.benchmarks import delineation_fused as dlf
from workflow.models.unet import FusedUNet, RefinementUNet
from workflow.training import Trainer, load_model

from tests.snakemake_helpers import ROOT, demo_args, snakemake

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
    alone = {"loss": [], "grad": [], "weights": []}
    for m, net, t in zip(models, nets, target_of, strict=True):
        ext = build_extractor(ARCH, lossnets=[net], weights="random").to(dtype)
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
    ext = build_extractor(ARCH, lossnets=nets, weights="random").to(dtype)
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
