"""The probe on features computed once draws what the per-step probe draws: each item's flip coin (vectorised
here, drawn by torch there) and the engine's micro-batches, item for item, from any position of the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from usp.data.sampler import DataStream, ResumableSampler, SeededDataset, sample_seed
from usp.latent.data import LatentData
from usp.train.tasks.probe_features import FeatureBatches, FeatureDataset, flip_coins


def _latent_data(flip: bool) -> LatentData:
    """The cached LatentData's per-sample draws (its `extras`) without a cache on disk."""
    data = LatentData.__new__(LatentData)
    data.vae, data.flip, data.sample_posterior = None, flip, False
    return data


def test_flip_coins_equal_torch_draws_under_each_seed():
    rng = np.random.default_rng(0)
    seeds = ([sample_seed(run, epoch, index) for run in (0, 7) for epoch in (0, 1, 89) for index in range(500)]
             + [int(s) for s in rng.integers(0, 2**63 - 1, 2000)] + [0, 1, 2**32 - 1, 2**32, 2**63 - 1])
    draws = _latent_data(flip=True)
    expected = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.default_generator.manual_seed(seed)  # as SeededDataset seeds an item
            expected.append(draws.extras()["flip"])
    coins = flip_coins(seeds)
    assert coins.dtype == bool and coins.tolist() == expected
    assert 0.45 < coins.mean() < 0.55  # a fair coin, not a constant that happens to agree


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize(("rank", "world", "epoch", "start"), [(0, 1, 0, 0), (0, 1, 3, 10), (1, 2, 2, 4)])
def test_feature_batches_are_the_dataloaders_batches(tmp_path, flip, rank, world, epoch, start):
    """Against the engine's own DataLoader over SeededDataset(FeatureDataset, LatentData.extras): equal
    features, labels and flips, batch for batch, from a resumed position, on a rank's shard, last partial
    batch dropped."""
    count, orientations, dim, micro = 53, 2, 5, 4
    path = tmp_path / "train.npy"
    np.save(path, np.random.default_rng(1).standard_normal((count, orientations, dim)).astype(np.float32))
    features = FeatureDataset(path, np.arange(count) % 10, dim)
    extras = _latent_data(flip).extras

    def stream(loader, sampler) -> list[dict]:
        data = DataStream(loader, sampler, micro)
        data.load_state_dict({"epoch": epoch, "offset": start})
        batches = iter(data)
        per_epoch = (count // world - start) // micro  # the rest of this epoch, then one more whole epoch
        return [next(batches) for _ in range(per_epoch + (count // world) // micro)]

    sampler = ResumableSampler(count, seed=3, rank=rank, world_size=world)
    reference = stream(DataLoader(SeededDataset(features, extras), batch_size=micro, sampler=sampler,
                                  drop_last=True), sampler)
    sampler = ResumableSampler(count, seed=3, rank=rank, world_size=world)
    batches = stream(FeatureBatches(features, sampler, micro, flip), sampler)
    assert len(batches) == len(reference) > 0
    for batch, expected in zip(batches, reference):
        assert batch.keys() == expected.keys()
        for key in expected:
            assert batch[key].dtype == expected[key].dtype, key
            assert torch.equal(batch[key], expected[key]), key
    assert any(b["flip"].any() for b in batches) == flip
