"""Partitions are seeded and non-IID; Local-T mirrors the train distribution, disjointly."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import load_client_data, split_test_like_train


def test_split_test_like_train_is_disjoint_and_proportional():
    rng = np.random.default_rng(0)
    test_labels = np.repeat(np.arange(4), 100)
    counts = np.array([[90, 10, 0, 0], [10, 90, 0, 50], [0, 0, 0, 50]])
    sets = split_test_like_train(test_labels, counts, rng)
    union = np.concatenate(sets)
    assert len(union) == len(np.unique(union)), "Local-T sets overlap"
    # class 2 is held by nobody, so none of its test samples is dealt out
    assert not np.isin(np.flatnonzero(test_labels == 2), union).any()
    per_client = [np.bincount(test_labels[s], minlength=4) for s in sets]
    np.testing.assert_array_equal(per_client[0], [90, 10, 0, 0])
    np.testing.assert_array_equal(per_client[1], [10, 90, 0, 50])
    np.testing.assert_array_equal(per_client[2], [0, 0, 0, 50])


def test_digits_partitions_cover_train_and_match_local_t():
    cfg = RunConfig(partitioner="dirichlet", dirichlet_beta=0.1)
    parts = [load_client_data(cfg, p, 4) for p in range(4)]
    assert sum(len(p.y_train) for p in parts) == 1347  # 75 % of 1,797 digits
    for p in parts:
        train_classes = set(p.y_train.unique().tolist())
        assert set(p.y_local_test.unique().tolist()) <= train_classes
        assert p.x_train.shape[1:] == (1, 8, 8)
        assert float(p.x_train.min()) >= -1.0 and float(p.x_train.max()) <= 1.0
    # Global-T is the union of the Local-T sets, identical on every client
    assert sum(len(p.y_local_test) for p in parts) == len(parts[0].y_global_test)
    assert all(torch.equal(p.y_global_test, parts[0].y_global_test) for p in parts)
    # beta = 0.1 is strongly non-IID: clients' label histograms differ
    hists = [np.bincount(p.y_train.numpy(), minlength=10) / len(p.y_train) for p in parts]
    assert max(np.abs(hists[0] - h).sum() for h in hists[1:]) > 0.5


def fresh_caches(monkeypatch) -> None:
    """Empty caches for drdfl_flwr.data's cached steps, for this test only (the module's
    own stay as they are): what follows is decoded again, not served."""
    from drdfl_flwr import data

    for name, cached in list(vars(data).items()):
        if callable(cached) and hasattr(cached, "cache_parameters"):
            size = cached.cache_parameters()["maxsize"]
            monkeypatch.setattr(data, name, functools.lru_cache(maxsize=size)(cached.__wrapped__))


def test_a_partition_is_decoded_once_and_another_partition_or_seed_anew(monkeypatch):
    """A second call (a learning rate is no part of the data) decodes nothing and gets the
    same tensors; another partition decodes its own training images, another seed its
    own split, and each gets other data."""
    from drdfl_flwr import data

    fresh_caches(monkeypatch)
    decoded: list[int] = []
    decode = data.decode_images

    def counting(images):
        decoded.append(len(images))
        return decode(images)

    monkeypatch.setattr(data, "decode_images", counting)
    cfg = RunConfig(partitioner="iid", seed=1)
    first = load_client_data(cfg, 0, 3)
    assert len(decoded) == 2  # its training images and the test split
    again = load_client_data(cfg.replace(learning_rate=0.5), 0, 3)
    assert len(decoded) == 2 and again is first
    other_partition = load_client_data(cfg, 1, 3)
    assert decoded[2:] == [len(other_partition.y_train)]  # the test split is reused
    assert not torch.equal(other_partition.x_train[:100], first.x_train[:100])
    assert torch.equal(other_partition.y_global_test, first.y_global_test)
    other_seed = load_client_data(cfg.replace(seed=2), 0, 3)
    assert len(decoded) == 5
    assert other_seed.y_train.tolist() != first.y_train.tolist()


def test_shard_partitioner_gives_s_classes_per_client():
    cfg = RunConfig(partitioner="shard", classes_per_client=3)
    for p in range(5):
        assert len(load_client_data(cfg, p, 5).y_train.unique()) == 3


def test_iid_partitions_are_seeded(monkeypatch):
    """Decoded twice from scratch, the same seed gives the same partition."""
    cfg = RunConfig(partitioner="iid", seed=1)
    fresh_caches(monkeypatch)
    first = load_client_data(cfg, 0, 3)
    fresh_caches(monkeypatch)
    second = load_client_data(cfg, 0, 3)
    assert second is not first
    assert torch.equal(second.x_train, first.x_train) and torch.equal(second.y_train, first.y_train)
    assert torch.equal(second.x_local_test, first.x_local_test)


def test_svhn_hub_path_on_data_the_test_makes(monkeypatch):
    """SVHN has no offline copy: fake the hub's answer, keep the real decoding path."""
    rng = np.random.default_rng(0)

    def split(n):
        images = [
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)
        ]
        return Dataset.from_dict({"image": images, "label": (np.arange(n) % 10).tolist()})

    class FakeHub:
        def __init__(self, dataset, subset, partitioners, shuffle, seed):
            assert (dataset, subset) == ("ufldl-stanford/svhn", "cropped_digits")
            assert shuffle and seed == 3  # the run's seed reaches the hub's shuffle

        def load_split(self, name):
            return split(60 if name == "train" else 20)

    import flwr_datasets  # data.py imports it where used (it is slow to import)

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeHub)
    client = load_client_data(RunConfig(dataset="svhn", partitioner="iid", seed=3), 0, 2)
    assert client.x_train.shape == (30, 3, 32, 32)
    assert client.num_classes == 10
    assert len(client.y_global_test) == 20


def test_unknown_dataset_name():
    with pytest.raises(ConfigError) as err:
        RunConfig(dataset="mnist")
    assert err.value.key == "dataset"


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shard"])
def test_the_seed_decides_the_partition_and_the_same_seed_repeats_it(partitioner, monkeypatch):
    """The seed reaches the shuffle before partitioning (the IID partitioner takes no
    seed of its own), so two seeds give two partitions and one seed always the same."""
    from drdfl_flwr.data import label_counts

    def client_labels(seed: int) -> list[int]:
        cfg = RunConfig(partitioner=partitioner, classes_per_client=4, seed=seed)
        return load_client_data(cfg, 0, 5).y_train.tolist()

    first = client_labels(1)
    fresh_caches(monkeypatch)  # decoded again, not served from the cache
    assert client_labels(1) == first
    assert client_labels(2) != first
    counts = [label_counts(RunConfig(partitioner=partitioner, seed=s), 5) for s in (1, 2)]
    assert counts[0].shape == counts[1].shape == (5, 10)
    assert not np.array_equal(counts[0], counts[1])
