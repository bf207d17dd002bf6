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
