"""A device's own data, used whole: no partitioner runs on it.

A SuperNode whose node config names ``own-data`` trains on that folder's training split
and is scored on its test split (its Local-T), as they are: a device's own photos or
sensor records, of whatever size and classes it has. The run's ``dataset`` says what the
task is (its image and label columns and its number of classes, from
:func:`drdfl_flwr.data.dataset_spec`); each device brings its own files of that task, in
either layout:

- the hub's parquet layout: ``train.parquet`` and ``test.parquet`` with the dataset's
  columns (what :mod:`drdfl_flwr.presplit` writes);
- an image folder: ``train/<label>/*.png`` (or .jpg, ...) and ``test/<label>/*``, one
  sub-folder per class named by the class's index ``0..K-1`` (an index, not a name, so
  that devices holding different classes agree on what each label means).

A common Global-T test set is optional and named separately (node config ``global-test``:
a folder in either layout, of which only its ``test`` split is read); without it a node
reports Local-T only. Every problem names the node, the path and what is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import ClientData, DatasetSpec, dataset_spec, decode_images, num_classes

OWN_DATA_KEY = "own-data"  # node config: the device's own folder
GLOBAL_TEST_KEY = "global-test"  # node config: a common test set (optional)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GRAY = ("1", "L", "I", "I;16", "F")  # read as one channel; every other mode as RGB


class OwnDataError(ValueError):
    """A device's own data that cannot be used, naming the node and the path."""

    def __init__(self, partition_id: int, path: Path, why: str) -> None:
        super().__init__(f"node with partition-id {partition_id}: {OWN_DATA_KEY} {path}: {why}")


def load_own_data(
    cfg: RunConfig, folder: str | Path, partition_id: int, global_test: str | Path | None = None
) -> ClientData:
    """The node's ClientData from its own ``folder`` (and ``global_test``), decoded once
    per process."""
    spec = dataset_spec(cfg)
    if not spec.num_classes:  # a dataset by name: its class count is read from its data
        try:
            spec = dataclasses.replace(spec, num_classes=num_classes(cfg))
        except Exception as err:  # noqa: BLE001 - named below, with what to do
            raise OwnDataError(
                partition_id,
                Path(folder),
                f"the run's dataset {cfg.dataset!r} gives no class count here ({err}); "
                "own data needs a built-in dataset or the named dataset reachable",
            ) from None
    return _own_data(
        spec,
        Path(folder).expanduser().resolve(),
        partition_id,
        Path(global_test).expanduser().resolve() if global_test else None,
    )


@functools.lru_cache(maxsize=4)
def _own_data(
    spec: DatasetSpec, folder: Path, partition_id: int, global_test: Path | None
) -> ClientData:
    if not folder.is_dir():
        raise OwnDataError(partition_id, folder, "no such folder")
    x_train, y_train = read_split(spec, folder, "train", partition_id)
    x_test, y_test = read_split(spec, folder, "test", partition_id)
    if global_test is not None:
        if not global_test.is_dir():
            raise OwnDataError(partition_id, global_test, f"{GLOBAL_TEST_KEY}: no such folder")
        x_global, y_global = read_split(spec, global_test, "test", partition_id)
    else:
        x_global, y_global = x_test[:0], y_test[:0]
    for name, x in (("test", x_test), (GLOBAL_TEST_KEY, x_global)):
        if len(x) and x.shape[1:] != x_train.shape[1:]:
            raise OwnDataError(
                partition_id,
                folder,
                f"{name} images are {tuple(x.shape[1:])}, training images "
                f"{tuple(x_train.shape[1:])}",
            )
    return ClientData(
        x_train=x_train,
        y_train=y_train,
        x_local_test=x_test,
        y_local_test=y_test,
        x_global_test=x_global,
        y_global_test=y_global,
        num_classes=spec.num_classes,
    )


def read_split(
    spec: DatasetSpec, folder: Path, split: str, partition_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images scaled as every dataset is, labels) of ``folder``'s ``split``."""
    parquet, images = folder / f"{split}.parquet", folder / split
    if parquet.is_file():
        pixels, labels = _parquet_columns(spec, parquet, partition_id)
        where = parquet
    elif images.is_dir():
        pixels, labels = _image_folder(images, spec.num_classes, partition_id)
        where = images
    else:
        raise OwnDataError(
            partition_id, folder, f"neither {split}.parquet nor a {split}/ image folder"
        )
    if not labels:
        raise OwnDataError(partition_id, where, f"the {split} split is empty")
    bad = sorted({v for v in labels if not (isinstance(v, int) and 0 <= v < spec.num_classes)})
    if bad:
        raise OwnDataError(
            partition_id,
            where,
            f"labels {bad[:5]} outside 0..{spec.num_classes - 1} (column {spec.label_column!r})",
        )
    try:
        x = decode_images(pixels)
    except ValueError as err:  # images of different sizes do not stack
        raise OwnDataError(partition_id, where, f"images do not decode together: {err}") from None
    return x, torch.tensor(labels, dtype=torch.long)


def _parquet_columns(spec: DatasetSpec, path: Path, partition_id: int) -> tuple[list, list]:
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception as err:  # noqa: BLE001 - anything unreadable is the file's fault
        raise OwnDataError(partition_id, path, f"not a readable parquet file ({err})") from None
    missing = {spec.image_column, spec.label_column} - set(table.column_names)
    if missing:
        raise OwnDataError(
            partition_id, path, f"has columns {table.column_names}, lacks {sorted(missing)}"
        )
    labels = [int(v) if isinstance(v, (int, np.integer)) else v for v in table[spec.label_column]]
    return list(table[spec.image_column]), labels


def _image_folder(folder: Path, num_classes: int, partition_id: int) -> tuple[list, list]:
    from PIL import Image

    pixels: list = []
    labels: list = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not class_dir.name.isdigit() or int(class_dir.name) >= num_classes:
            raise OwnDataError(
                partition_id,
                class_dir,
                f"a class folder is named by its label, 0..{num_classes - 1}",
            )
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    pixels.append(np.asarray(image.convert("L" if image.mode in GRAY else "RGB")))
            except Exception as err:  # noqa: BLE001 - a damaged file is named, not skipped
                raise OwnDataError(partition_id, path, f"not a readable image ({err})") from None
            labels.append(int(class_dir.name))
    return pixels, labels


def own_data_folders(node_config: dict) -> tuple[Path | None, Path | None]:
    """The node config's ``own-data`` and ``global-test`` folders (None when unset)."""
    own = node_config.get(OWN_DATA_KEY)
    common = node_config.get(GLOBAL_TEST_KEY)
    return (Path(str(own)) if own else None, Path(str(common)) if common else None)
