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
