"""Image banks and the epoch sampler (workflow/datasets/bank.py), against NumPy slicing and
permutations worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workflow.datasets.bank import EpochSampler, ImageBank, crop_grid, placement, random_crops

CPU = torch.device("cpu")


def _images(n=6, h=10, w=12, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_placement_rule():
    assert placement(10, CPU) == "device"  # a CPU job's device is its RAM
    assert placement(10, CPU, "never") == "host"
    assert placement(1 << 62, CPU) == "disk"  # more than the RAM: stays memory-mapped
    assert placement(1 << 62, CPU, "always") == "device"
    with pytest.raises(ValueError, match="data_on_device"):
        placement(10, CPU, "sometimes")


@pytest.mark.parametrize("policy", ["auto", "never"])
def test_gather_and_crops_equal_numpy_slicing(tmp_path, policy):
    arr = _images()
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    banks = [ImageBank(mm, CPU, policy)]
    banks.append(ImageBank(mm, CPU, "always"))
    banks[-1].data = mm  # the memory-mapped path, as for a bank too large for RAM
    idx = torch.tensor([4, 0, 4])
    top, left = torch.tensor([0, 3, 2]), torch.tensor([5, 0, 1])
    flips = torch.tensor([False, True, True])
    rows, cols = crop_grid(top, left, 6, flips)
    for bank in banks:
        assert torch.equal(bank.gather(idx), torch.from_numpy(arr[[4, 0, 4]]))
        crops = bank.gather(idx, rows, cols).numpy()
        for k, (i, t, lft, f) in enumerate(zip([4, 0, 4], top, left, flips, strict=True)):
            want = arr[i, t:t + 6, lft:lft + 6]
            assert np.array_equal(crops[k], want[:, ::-1] if f else want)
        x = bank.images(idx, pad=2)
        assert x.shape == (3, 3, 14, 16) and x.dtype == torch.float32
        # the centre of the padded image is the float image, the border its reflection
        assert torch.equal(x[:, :, 2:-2, 2:-2],
                           torch.from_numpy(arr[[4, 0, 4]]).permute(0, 3, 1, 2) / 255.0)
        assert torch.equal(x[:, :, 0], x[:, :, 4])


def test_random_crops_draw_order():
    """top offsets, then left offsets, then flips, all from the global torch RNG."""
    torch.manual_seed(5)
    top, left, flips = random_crops(4, 20, 30, 8, flip=True)
    torch.manual_seed(5)
    assert torch.equal(top, torch.randint(0, 13, (4,)))
    assert torch.equal(left, torch.randint(0, 23, (4,)))
    assert torch.equal(flips, torch.rand(4) < 0.5)
    assert random_crops(2, 8, 8, 8)[2] is None
    with pytest.raises(ValueError, match="exceeds"):
        random_crops(1, 8, 8, 9)


def test_epoch_sampler_visits_every_item_once_per_epoch():
    s = EpochSampler(10, 4, seed=2)
    assert s.steps_per_epoch == 3  # 4 + 4 + 2
    for epoch in range(3):
        seen = torch.cat([s(epoch * 3 + k) for k in range(3)])
        g = torch.Generator().manual_seed(2 * 1_000_003 + epoch)
        assert torch.equal(seen, torch.randperm(10, generator=g))
    # a resumed run (a fresh sampler) draws the same batch for the same step
    assert torch.equal(EpochSampler(10, 4, seed=2)(7), s(7))


def test_epoch_sampler_min_batch_items_and_stride():
    assert EpochSampler(9, 4, seed=0, min_batch=2).steps_per_epoch == 2  # trailing 1 dropped
    assert EpochSampler(10, 4, seed=0, min_batch=2).steps_per_epoch == 3
    with pytest.raises(ValueError, match="too few"):
        EpochSampler(1, 4, seed=0, min_batch=2)
    items = torch.tensor([10, 20, 30, 40, 50])
    s = EpochSampler(items, 5, seed=1, seed_stride=100_003)
    g = torch.Generator().manual_seed(100_003 + 0)
    assert torch.equal(s(0), items[torch.randperm(5, generator=g)])


def test_the_index_path_never_reads_the_device():
    """No step's index path brings a value to the host (a host sync on a GPU): run on the
    meta device, whose tensors have no data (``.item()``, ``.tolist()``, ``.cpu()``, NumPy
    all raise), sampler, crops and a device bank's gather still give every step's batch;
    the epoch order is drawn on the CPU and copied over once per epoch."""
    from workflow.benchmarks.super_resolution import train_batches
    from workflow.imaging import masks_to_float

    meta = torch.device("meta")
    bank = ImageBank(_images(n=7), meta, "always")
    masks = ImageBank(_images(n=7)[..., 0], meta, "always")
    assert bank.where == "device" and bank.data.device == meta
    sampler = EpochSampler(torch.arange(7), 3, seed=0, device=meta, min_batch=2)
    for step in range(2 * sampler.steps_per_epoch + 1):  # across two epoch boundaries
        idx = sampler(step)
        assert idx.device == meta and idx.shape == (3,)  # the trailing single item dropped
        top, left, flips = random_crops(len(idx), 10, 12, 6, flip=True, device=meta)
        rows, cols = crop_grid(top, left, 6, flips)
        img = bank.images(idx, rows, cols, channels_last=True)  # delineation's step
        gt = masks_to_float(masks.gather(idx, rows, cols))
        assert img.shape == (len(idx), 3, 6, 6) and gt.shape == (len(idx), 1, 6, 6)
        assert bank.images(idx, pad=2).shape == (len(idx), 3, 14, 16)  # the autoencoder's
    for crop in (8, None):  # super-resolution's, cropping and not
        batch = train_batches(bank, EpochSampler(7, 2, seed=0, device=meta), crop)
        assert [tuple(batch(s).shape) for s in (2, 3, 4)] == [
            (2, 3, crop or 10, crop or 12), (1, 3, crop or 10, crop or 12),
            (2, 3, crop or 10, crop or 12)]
    with pytest.raises((RuntimeError, NotImplementedError)):
        sampler(0).tolist()  # the stand-in really cannot be read


@pytest.mark.gpu
def test_sampler_on_cuda_makes_no_host_sync_and_draws_the_cpu_order():
    cuda = torch.device("cuda")
    sampler, on_cpu = EpochSampler(100, 8, seed=3, device=cuda), EpochSampler(100, 8, seed=3)
    bank = ImageBank(_images(n=100), cuda, "always")
    sampler(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        steps = [sampler(k) for k in range(3 * sampler.steps_per_epoch)]  # 2 epoch changes
        top, left, flips = random_crops(8, 10, 12, 6, flip=True, device=cuda)
        crops = bank.images(steps[-1], *crop_grid(top, left, 6, flips))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert crops.device.type == "cuda"
    for k, idx in enumerate(steps):
        assert idx.device.type == "cuda" and torch.equal(idx.cpu(), on_cpu(k))
