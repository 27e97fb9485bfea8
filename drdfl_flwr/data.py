"""Data sources, non-IID partitions and the paper's two test sets (Local-T, Global-T).

One path serves every source: a Hugging Face ``datasets.Dataset`` for the train and the
test split, partitioned by a flwr-datasets partitioner, then decoded once into tensors.
Sources are the hub (through ``FederatedDataset``), a local folder of parquet files in
the hub's layout (also through ``FederatedDataset``), and scikit-learn's 8x8 digits,
embedded so that the default job runs on a machine with no network. Four datasets are
built in (:data:`SPECS`: their columns and class counts known); any other is named in the
config with its image and label columns (:func:`dataset_spec`), its class count read from
the label column and its image shape from the images.

Local-T of client m holds test samples with m's training class distribution: for every
class k, the test samples of k are dealt out to the clients in proportion to how many
training samples of k each holds, so the sets are disjoint and their union (Global-T)
is, up to rounding, every test sample of every class that some client trains on.

The run's ``seed`` reaches every random choice here: the shuffle of both splits before
partitioning (flwr-datasets fixes it at 42 unless told), the partitioner, the subsets
and the dealing of the test set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from drdfl_flwr.config import DATASETS, ConfigError, RunConfig
from drdfl_flwr.logs import log
from drdfl_flwr.oracle import with_absent_classes
from drdfl_flwr.partitioners import client_dirichlet_partitioner

if TYPE_CHECKING:
    # Imported where used: they take ~4 s to import (scipy, seaborn, pandas), and a
    # deployed node that reads its partition from its cache never needs them.
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how its columns are called. ``num_classes`` 0:
    read from the data (:func:`num_classes`)."""

    hub_name: str
    image_column: str
    label_column: str
    num_classes: int
    hub_subset: str | None = None


SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("sklearn:digits", "pixels", "label", 10),
    "cifar10": DatasetSpec("uoft-cs/cifar10", "img", "label", 10),
    "cifar100": DatasetSpec("uoft-cs/cifar100", "img", "fine_label", 100),
    "svhn": DatasetSpec("ufldl-stanford/svhn", "image", "label", 10, "cropped_digits"),
}
assert set(SPECS) == set(DATASETS), "config.DATASETS and data.SPECS must list the same names"


@dataclass(frozen=True)
class ClientData:
    """Everything one client trains and is evaluated on, as ready tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_local_test: torch.Tensor
    y_local_test: torch.Tensor
    x_global_test: torch.Tensor
    y_global_test: torch.Tensor
    num_classes: int
    # the node's own partition's labels where training holds more (the oracle diagnostic,
    # drdfl_flwr/oracle.py); None: y_train is the node's own
    y_own: torch.Tensor | None = None

    @property
    def own_labels(self) -> torch.Tensor:
        """The labels of the node's own partition, which define its class prior: scoring's
        p_k, the classes it lacks, the majority floor. An oracle's extra images of absent
        classes change what it trains on, not what its test data looks like."""
        return self.y_train if self.y_own is None else self.y_own

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def dataset_spec(cfg: RunConfig) -> DatasetSpec:
    """The run's dataset: a built-in one as :data:`SPECS` has it, with whatever of
    ``image-column``, ``label-column``, ``dataset-subset`` the config sets instead (another
    label column: its classes read from the data); any other dataset by its name and the
    columns the config names (RunConfig made sure it names them), classes from the data."""
    builtin = SPECS.get(cfg.dataset)
    if builtin is None:
        return DatasetSpec(
            cfg.dataset, cfg.image_column, cfg.label_column, 0, cfg.dataset_subset or None
        )
    changes: dict[str, Any] = {}
    if cfg.image_column:
        changes["image_column"] = cfg.image_column
    if cfg.label_column and cfg.label_column != builtin.label_column:
        changes.update(label_column=cfg.label_column, num_classes=0)
    if cfg.dataset_subset:
        changes["hub_subset"] = cfg.dataset_subset
    return dataclasses.replace(builtin, **changes)


def load_client_data(
    cfg: RunConfig, partition_id: int, num_partitions: int, cache_dir: Path | None = None
) -> ClientData:
    """The client's tensors; decoded once per process, then served from a cache.

    With ``cache_dir`` (a SuperNode's own disk), also decoded once per node: on real
    SuperNodes every message runs in a fresh process, which would otherwise partition
    and decode the dataset again for every round."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    key = _data_key(cfg)
    if cache_dir is None:
        return _client_data(key, partition_id, num_partitions)
    digest = hashlib.sha256(
        json.dumps([key.to_run_config(), partition_id, num_partitions], sort_keys=True).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"partition{partition_id}-of{num_partitions}-{digest}.pt"
    if path.is_file():
        try:
            return ClientData(**torch.load(path))
        except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            log(WARNING, "data cache %s unreadable (%s); decoding again", path, err)
    data = _client_data(key, partition_id, num_partitions)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(dataclasses.asdict(data), partial)
    os.replace(partial, path)
    return data


def _data_key(cfg: RunConfig) -> RunConfig:
    """Only the data-relevant fields, so a change of learning rate keeps the cache warm:
    the source's (:func:`_source_key`) and how it is subset and partitioned."""
    return _source_key(cfg).replace(
        partitioner=cfg.partitioner,
        dirichlet_beta=cfg.dirichlet_beta,
        classes_per_client=cfg.classes_per_client,
        shard_assignment=cfg.shard_assignment,
        subset_train=cfg.subset_train,
        subset_test=cfg.subset_test,
        oracle_absent_per_class=cfg.oracle_absent_per_class,
    )


@functools.lru_cache(maxsize=64)
def _client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    if cfg.oracle_absent_per_class:  # the plain partitions, each decoded once, pooled
        plain = cfg.replace(oracle_absent_per_class=0)
        others = [_client_data(plain, q, num_partitions) for q in range(num_partitions)]
        own = others.pop(partition_id)
        return with_absent_classes(
            own,
            torch.cat([o.x_train for o in others]),
            torch.cat([o.y_train for o in others]),
            cfg.oracle_absent_per_class,
            seed=(cfg.seed, partition_id),
        )
    spec = dataset_spec(cfg)
    plan = _partition_plan(cfg, num_partitions)
    train = plan.partitioner.load_partition(partition_id)
    x_train = _decode(train, spec)
    y_train = torch.tensor(train[spec.label_column], dtype=torch.long)
    x_test, y_test = _decoded_test(cfg)
    local_idx = plan.local_test_indices[partition_id]
    x_global, y_global = _global_test(cfg, num_partitions)
    return ClientData(
        x_train=x_train,
        y_train=y_train,
        x_local_test=x_test[local_idx],
        y_local_test=y_test[local_idx],
        x_global_test=x_global,
        y_global_test=y_global,
        num_classes=num_classes(cfg),
    )


@functools.lru_cache(maxsize=4)
def _global_test(cfg: RunConfig, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-T, once per process: every client's ClientData points at these same
    tensors (a copy per client cost 20 x 25 MB per process for 2,000 CIFAR test images)."""
    x_test, y_test = _decoded_test(cfg)
    global_idx = np.concatenate(_partition_plan(cfg, num_partitions).local_test_indices)
    return x_test[global_idx], y_test[global_idx]


@dataclass(frozen=True)
class _PartitionPlan:
    partitioner: Partitioner
    local_test_indices: list[np.ndarray]
    label_counts: np.ndarray  # (clients, classes): training samples of class k on client m


@functools.lru_cache(maxsize=4)
def _partition_plan(cfg: RunConfig, num_partitions: int) -> _PartitionPlan:
    spec = dataset_spec(cfg)
    train, test = _splits(cfg)
    classes = num_classes(cfg)
    if len(train) < num_partitions:
        raise ConfigError(
            "subset-train" if cfg.subset_train else "dataset",
            cfg.subset_train or cfg.dataset,
            f"{len(train)} training samples cannot be split over {num_partitions} clients",
        )
    partitioner = make_partitioner(cfg, num_partitions, spec, classes)
    partitioner.dataset = train
    counts = np.stack(
        [
            np.bincount(partitioner.load_partition(p)[spec.label_column], minlength=classes)
            for p in range(num_partitions)
        ]
    )
    _warn_unheld_classes(cfg, counts, np.asarray(train[spec.label_column]))
    local = split_test_like_train(
        np.asarray(test[spec.label_column]), counts, np.random.default_rng(cfg.seed)
    )
    return _PartitionPlan(partitioner, local, counts)


def label_counts(cfg: RunConfig, num_partitions: int) -> np.ndarray:
    """How many training samples of each class every client holds, shape (clients,
    classes): the partition a run trains on, for label-distribution plots and tables.
    Read from the cached plan, so it is exactly what the clients load."""
    return _partition_plan(_data_key(cfg), num_partitions).label_counts.copy()


def check_partition_plan(cfg: RunConfig, num_partitions: int) -> np.ndarray:
    """The run's partitions drawn once, before any node starts: a partitioner that cannot
    draw ``num_partitions`` of them, or draws an empty one, stops the run here with what to
    change, instead of failing in every ClientApp (each drawing the same plan on its own).
    Returns the label counts (clients x classes)."""
    try:
        counts = label_counts(cfg, num_partitions)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            "partitioner",
            cfg.partitioner,
            f"cannot draw {num_partitions} partitions of {cfg.dataset} ({err}). "
            + _partition_hint(cfg),
        ) from None
    empty = [int(p) for p in np.flatnonzero(counts.sum(1) == 0)]
    if empty:
        raise ConfigError(
            "partitioner",
            cfg.partitioner,
            f"{len(empty)} of {num_partitions} partitions of {cfg.dataset} are empty "
            f"(partition ids {empty[:10]}). " + _partition_hint(cfg),
        )
    return counts


def _partition_hint(cfg: RunConfig) -> str:
    if cfg.partitioner == "dirichlet":
        return (
            f"With many clients and a small dirichlet-beta ({cfg.dirichlet_beta:g}) some "
            'clients draw no sample: use partitioner = "dirichlet-client" (each client '
            "draws its own class mix at the same beta and holds N/M samples), raise "
            'dirichlet-beta, use fewer clients, or use partitioner = "shard".'
        )
    return "Use fewer clients or more data (subset-train = 0: all of it)."


def _warn_unheld_classes(cfg: RunConfig, counts: np.ndarray, train_labels: np.ndarray) -> None:
    """A class in the data that no client holds is gone from the whole federation (and
    from every Local-T and Global-T set): say so, naming the classes and the way out."""
    present = np.flatnonzero(np.bincount(train_labels, minlength=counts.shape[1]))
    unheld = [int(k) for k in present if counts[:, k].sum() == 0]
    if unheld:
        hint = (
            ' (shard-assignment = "balanced" gives every class to some client)'
            if cfg.partitioner == "shard" and cfg.shard_assignment == "random"
            else ""
        )
        log(
            WARNING,
            "%d of %d classes are held by no client and leave the federation: %s%s",
            len(unheld),
            len(present),
            unheld,
            hint,
        )


def make_partitioner(
    cfg: RunConfig, num_partitions: int, spec: DatasetSpec, classes: int
) -> Partitioner:
    """The run's partitioner over ``spec``'s label column (``classes`` classes)."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if cfg.partitioner == "iid":
        # IidPartitioner takes no seed: it cuts the split in order, and the split was
        # shuffled with the run's seed (_splits), so the seed still decides who gets what.
        return IidPartitioner(num_partitions)
    if cfg.partitioner == "dirichlet-client":
        return client_dirichlet_partitioner(
            num_partitions, spec.label_column, cfg.dirichlet_beta, cfg.seed
        )
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            spec.label_column,
            alpha=cfg.dirichlet_beta,
            min_partition_size=1,
            self_balancing=False,
            seed=cfg.seed,
        )
    if cfg.classes_per_client > classes:
        raise ConfigError(
            "classes-per-client",
            cfg.classes_per_client,
            f"{cfg.dataset} has only {classes} classes",
        )
    if cfg.shard_assignment == "random":
        return PathologicalPartitioner(
            num_partitions,
            spec.label_column,
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="random",
            seed=cfg.seed,
        )
    return _balanced_shard_partitioner(num_partitions, spec.label_column, cfg)


def balanced_class_assignment(
    num_partitions: int, labels: list[Any], per_partition: int, rng: np.random.Generator
) -> dict[int, list[Any]]:
    """``per_partition`` distinct classes for each partition, every class held by as many
    partitions as any other (give or take one), ties broken by ``rng``.

    flwr-datasets' ``random`` mode draws each partition's classes independently, so
    classes nobody drew vanish from the federation (15 of CIFAR-100's 100 at 10 clients
    x 20 classes) and the test sets dealt like the training data lose them too. Here a
    class is held by nobody only when there are fewer slots than classes."""
    held = dict.fromkeys(labels, 0)
    assignment = {}
    for partition in range(num_partitions):
        order = rng.permutation(len(labels))
        chosen = sorted((labels[i] for i in order), key=lambda label: held[label])
        assignment[partition] = chosen[:per_partition]
        for label in assignment[partition]:
            held[label] += 1
    return assignment


def _balanced_shard_partitioner(
    num_partitions: int, label_column: str, cfg: RunConfig
) -> Partitioner:
    from flwr_datasets.partitioner import PathologicalPartitioner

    class BalancedShardPartitioner(PathologicalPartitioner):
        """flwr-datasets' pathological partitioner (each class's samples split among the
        partitions that hold it) with :func:`balanced_class_assignment` choosing who holds
        what."""

        def _determine_partition_id_to_unique_labels(self) -> None:
            self._unique_labels = sorted(self.dataset.unique(self._partition_by))
            assignment = balanced_class_assignment(
                self._num_partitions,
                self._unique_labels,
                self._num_classes_per_partition,
                self._rng,
            )
            for partition, labels in assignment.items():
                self._partition_id_to_unique_labels[partition] = labels

    return BalancedShardPartitioner(
        num_partitions,
        label_column,
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="random",
        seed=cfg.seed,
    )


def split_test_like_train(
    test_labels: np.ndarray, train_counts: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Deal each class's test samples to clients in proportion to their train counts.

    ``train_counts[m, k]`` is how many training samples of class k client m holds. The
    returned index sets are disjoint, and client m's set has (up to rounding) m's
    training class distribution.
    """
    num_clients, num_classes = train_counts.shape
    dealt: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(num_classes):
        owners = train_counts[:, k]
        if owners.sum() == 0:
            continue
        pool = rng.permutation(np.flatnonzero(test_labels == k))
        cuts = np.floor(np.cumsum(owners) / owners.sum() * len(pool)).astype(int)
        for m, chunk in enumerate(np.split(pool, cuts[:-1])):
            dealt[m].append(chunk)
    return [
        np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64) for parts in dealt
    ]


@dataclass(frozen=True)
class _Source:
    """The run's two splits as the source gives them (shuffled with the run's seed, no
    subset taken) and their number of classes."""

    train: Dataset
    test: Dataset
    num_classes: int


@functools.lru_cache(maxsize=4)
def _source(cfg: RunConfig) -> _Source:
    import datasets

    # no progress bars from datasets (generating splits, shuffling, selecting): every node
    # would print its own between the rounds' lines
    datasets.disable_progress_bars()
    spec = dataset_spec(cfg)
    if cfg.data_dir:
        train, test = _parquet_splits(Path(cfg.data_dir).expanduser(), cfg.seed)
    elif cfg.dataset == "digits":
        train, test = _digits_splits(cfg.seed)
    else:
        from flwr_datasets import FederatedDataset

        fds = FederatedDataset(
            dataset=spec.hub_name,
            subset=spec.hub_subset,
            partitioners={},
            shuffle=True,
            seed=cfg.seed,
        )
        splits = []
        for name in ("train", "test"):
            try:
                splits.append(fds.load_split(name))
            except ValueError as err:  # flwr-datasets: a split the dataset does not have
                raise ConfigError(
                    "dataset", cfg.dataset, f"has no {name} split to use ({err})"
                ) from None
        train, test = splits
    for split, name in ((train, "train"), (test, "test")):
        for key, column in (
            ("image-column", spec.image_column),
            ("label-column", spec.label_column),
        ):
            if column not in split.column_names:
                raise ConfigError(
                    key,
                    column,
                    f"the {name} split of {cfg.dataset} has no such column; its columns are "
                    f"{split.column_names}",
                )
    return _Source(train, test, spec.num_classes or _class_count(cfg, spec, train, test))


def _class_count(cfg: RunConfig, spec: DatasetSpec, train: Dataset, test: Dataset) -> int:
    """The number of classes of a dataset that is not built in, from its label column:
    a class-label feature says it; otherwise the labels must be integers 0..K-1 and K is
    the largest + 1. Anything else is refused, naming the column."""
    from datasets import ClassLabel, Value

    column = spec.label_column
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return int(feature.num_classes)
    if not (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
        raise ConfigError(
            "label-column",
            column,
            f"holds {kind} values in {cfg.dataset}; labels must be integers 0..K-1",
        )
    labels = np.concatenate([np.asarray(train[column]), np.asarray(test[column])])
    if labels.size == 0:
        raise ConfigError("dataset", cfg.dataset, "has no labelled samples")
    if labels.min() < 0:
        raise ConfigError(
            "label-column",
            column,
            f"holds the negative label {int(labels.min())} in {cfg.dataset}; labels must be "
            "integers 0..K-1",
        )
    classes = int(labels.max()) + 1
    if classes < 2:
        raise ConfigError(
            "label-column", column, f"holds one class only in {cfg.dataset}: nothing to classify"
        )
    return classes


def num_classes(cfg: RunConfig) -> int:
    """The run's number of classes: the built-in dataset's, or read from the data."""
    return _source(_source_key(cfg)).num_classes


def _source_key(cfg: RunConfig) -> RunConfig:
    """Only what decides the source's splits (not the subsets, not the partitioner)."""
    return RunConfig(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        dataset_subset=cfg.dataset_subset,
        seed=cfg.seed,
    )


@functools.lru_cache(maxsize=4)
def _splits(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """The splits the run uses: the source's, or a seeded subset of them."""
    source = _source(_source_key(cfg))
    train, test = source.train, source.test
    if cfg.subset_train:
        train = train.shuffle(seed=cfg.seed).select(range(min(cfg.subset_train, len(train))))
    if cfg.subset_test:
        test = test.shuffle(seed=cfg.seed).select(range(min(cfg.subset_test, len(test))))
    return train, test


def _parquet_splits(folder: Path, seed: int) -> tuple[Dataset, Dataset]:
    if not folder.is_dir():
        raise ConfigError("data-dir", str(folder), "no such folder")
    from flwr_datasets import FederatedDataset

    files = {s: str(folder / f"{s}.parquet") for s in ("train", "test")}
    fds = FederatedDataset(
        dataset="parquet", data_files=files, partitioners={}, shuffle=True, seed=seed
    )
    return fds.load_split("train"), fds.load_split("test")


def _digits_splits(seed: int) -> tuple[Dataset, Dataset]:
    """scikit-learn's 1,797 real 8x8 digits, split 75/25 stratified with a fixed seed (the
    split is the dataset's definition, like CIFAR's), then shuffled with the run's seed as
    FederatedDataset shuffles the hub's datasets."""
    from datasets import Dataset
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        pixels, digits.target, test_size=0.25, stratify=digits.target, random_state=0
    )
    return (
        Dataset.from_dict({"pixels": list(x_tr), "label": y_tr.tolist()}).shuffle(seed=seed),
        Dataset.from_dict({"pixels": list(x_te), "label": y_te.tolist()}).shuffle(seed=seed),
    )


def data_identity(cfg: RunConfig) -> dict:
    """What a run's data is, wherever it lies: the dataset's name and, for a parquet
    folder (``data-dir``), each split file's row count, size and SHA-256 (the files the
    run reads, so ``sha256sum train.parquet test.parquet`` checks it); for the hub or the
    embedded digits, the source's name. Two runs with equal identities read the same
    bytes; a moved or copied folder keeps its identity, edited files do not. A split
    file that is missing has ``None``, which matches no run that actually ran."""
    spec = dataset_spec(cfg)
    if not cfg.data_dir:
        source = {"source": spec.hub_name}
        if spec.hub_subset:
            source["subset"] = spec.hub_subset
        return {"dataset": cfg.dataset, **source}
    folder = Path(cfg.data_dir).expanduser()
    splits = {}
    for split in ("train", "test"):
        path = folder / f"{split}.parquet"
        try:
            stat = path.stat()
        except OSError:
            splits[split] = None
            continue
        splits[split] = _parquet_file_identity(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return {"dataset": cfg.dataset, "source": "parquet", "splits": splits}


@functools.lru_cache(maxsize=16)
def _parquet_file_identity(path: str, size: int, mtime_ns: int) -> dict:
    """Rows, bytes and SHA-256 of one file, hashed once per process while its size and
    modification time stay (CIFAR-10's 136 MB take under a second)."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - not parquet: the hash still tells it apart
        rows = None
    return {"rows": rows, "bytes": size, "sha256": digest.hexdigest()}


@functools.lru_cache(maxsize=4)
def _decoded_test(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    spec = dataset_spec(cfg)
    _, test = _splits(cfg)
    return _decode(test, spec), torch.tensor(test[spec.label_column], dtype=torch.long)


def _decode(split: Dataset, spec: DatasetSpec) -> torch.Tensor:
    """:func:`decode_images` of the split's image column; images that do not decode
    into one batch are refused naming the column."""
    try:
        return decode_images(split[spec.image_column])
    except ImageError as err:
        raise ConfigError("image-column", spec.image_column, str(err)) from None


PIXEL_RANGE = (-1.0, 1.0)  # the project's image scale: decode_images maps [0, 1] here


class ImageError(ValueError):
    """Images that do not make one batch (sizes differ, pixels out of range, not images)."""


def _pixels(image: Any) -> np.ndarray:
    """One image as an array: a PIL image (palette, alpha or 16-bit modes as RGB), encoded
    bytes (a parquet image column without the hub's feature metadata reads as
    ``{"bytes": ..., "path": ...}``), or an array of pixels."""
    from PIL import Image

    if isinstance(image, dict) and image.get("bytes") is not None:
        image = image["bytes"]
    if isinstance(image, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(image))
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds
            raise ImageError(f"holds bytes that are no image ({err})") from None
    if isinstance(image, Image.Image) and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype == object or array.ndim not in (2, 3):
        raise ImageError(f"holds {type(image).__name__} values, not images")
    return array


def decode_images(images: Sequence) -> torch.Tensor:
    """Images (PIL images, encoded bytes, uint8 arrays in 0..255 or float arrays in
    [0, 1]) -> float32 (N, C, H, W) scaled to [-1, 1]. Grayscale images beside colour
    ones are repeated to three channels; images of different sizes are refused
    (:class:`ImageError`)."""
    if len(images) == 0:
        raise ValueError("no images to decode (empty partition)")
    arrays = [_pixels(im) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1 and len({a.shape[:2] for a in arrays}) == 1:
        arrays = [_three_channels(a) for a in arrays]  # grayscale beside colour
        shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ImageError(
            f"holds images of {len(shapes)} shapes ({', '.join(map(str, sorted(shapes)[:4]))}"
            "...): resize them to one size first"
        )
    batch = np.stack(arrays)
    if batch.dtype == np.uint8:
        batch = batch.astype(np.float32) / 255.0
    elif np.issubdtype(batch.dtype, np.integer):
        if batch.min() < 0 or batch.max() > 255:
            raise ImageError("holds integer pixels outside 0..255")
        batch = batch.astype(np.float32) / 255.0
    elif np.issubdtype(batch.dtype, np.floating):
        if not (np.isfinite(batch).all() and batch.min() >= 0.0 and batch.max() <= 1.0):
            raise ImageError("holds float pixels outside [0, 1]")
    else:
        raise ImageError(f"holds {batch.dtype} pixels, not numbers")
    batch = batch.astype(np.float32)
    if batch.ndim == 3:  # grayscale (N, H, W)
        batch = batch[:, None]
    else:  # (N, H, W, C)
        batch = batch.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(batch * 2.0 - 1.0))


def _three_channels(array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) -> (H, W, 3); colour images as they are."""
    if array.ndim == 2:
        array = array[..., None]
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array
