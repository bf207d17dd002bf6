"""The job context (workflow/job.py): resolved once, handed to everything that computes."""

from __future__ import annotations

import pytest
import torch

from workflow.archs import LossNet
from workflow.job import Job, autocast, pick_device, resolve_precision


def test_device_and_precision_resolution():
    assert pick_device("cpu").type == "cpu"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pick_device("cuda")


def test_bf16_autocast_on_the_cpu_path():
    """The CUDA path's bf16 autocast, exercised on the CPU: matmuls come out in bf16."""
    x = torch.rand(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32


def test_create_reads_config_and_settings_once():
    before = torch.get_num_threads()
    try:
        job = Job.create({"precision": "auto", "weights": "random", "weights_seed": 3},
                         {"device": "cpu", "threads": 1, "batch_size": 7,
                          "weights_dir": "somewhere"})
        assert job.device.type == "cpu" and job.precision == "fp32"
        assert torch.get_num_threads() == 1 and not job.channels_last
        assert job.setting("batch_size") == 7
        with pytest.raises(KeyError, match="tile_size"):
            job.setting("tile_size")
    finally:
        torch.set_num_threads(before)


def test_extractor_and_provenance():
    job = Job.create({"precision": "fp32", "weights": "random", "weights_seed": 1},
                     {"device": "cpu"})
    ext = job.extractor([LossNet("alexnet", "2"), LossNet("alexnet", "4")], "none")
    assert ext.taps == (4, 11) and not any(p.requires_grad for p in ext.parameters())
    again = job.extractor(LossNet("alexnet", "2"), "none")
    # the same seed gives the same random weights
    assert torch.equal(next(ext.parameters()), next(again.parameters()))
    with pytest.raises(ValueError, match="one architecture"):
        job.extractor([LossNet("alexnet", "2"), LossNet("vgg16", "2")])
    prov = job.provenance("alexnet")
    assert prov["weights_id"] == "random" and prov["device"] == "cpu"
    assert prov["precision"] == "fp32" and prov["wall_time_s"] >= 0
    assert job.provenance(None)["weights_id"] == "none"


# ----------------------------------------------------------------------------- MPS


@pytest.fixture
def fake_mps(monkeypatch):
    """An Apple-silicon machine as torch reports it: MPS available, no CUDA, macOS 14."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    return monkeypatch


def test_mps_without_the_hardware_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device is 'mps' but MPS is not available"):
        pick_device("mps")
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"  # auto never picks an absent MPS


def test_auto_picks_mps_where_cuda_does_not_exist(fake_mps, capsys):
    assert pick_device("auto") == torch.device("mps")
    assert pick_device("mps") == torch.device("mps")
    assert capsys.readouterr().err == ""  # the fallback is on: nothing to warn about
    fake_mps.delenv("PYTORCH_ENABLE_MPS_FALLBACK")
    for name in ("mps", "auto"):
        assert pick_device(name).type == "mps"
        err = capsys.readouterr().err
        assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in err and "warning: device mps" in err, name


def test_mps_precision_and_autocast(fake_mps):
    mps = torch.device("mps")
    assert resolve_precision("auto", mps) == "fp32"
    assert resolve_precision("bf16", mps) == "bf16"
    fake_mps.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    with pytest.raises(ValueError, match="bf16 from macOS 14"):
        resolve_precision("bf16", mps)
    fake_mps.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    before = torch.get_num_threads()
    try:
        job = Job.create({"precision": "bf16"}, {"device": "mps", "threads": 1})
    finally:
        torch.set_num_threads(before)
    assert job.device.type == "mps" and job.precision == "bf16"
    assert not job.channels_last  # MPS kernels take NCHW
    # the autocast the trainer and evaluators enter: MPS autocast in bf16 (state only: no
    # MPS kernel runs here), and nothing at all in fp32
    with job.autocast():
        assert torch.is_autocast_enabled("mps")
        assert torch.get_autocast_dtype("mps") == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("mps")
    fp32 = Job.create({"precision": "auto"}, {"device": "mps"})
    assert fp32.precision == "fp32"
    with fp32.autocast():
        assert not torch.is_autocast_enabled("mps")
