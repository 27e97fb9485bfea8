"""Any image-classification dataset by name with its image and label columns: a parquet
folder the test makes (3 classes, 8x8 images under ``pixels``/``target``, names no
built-in dataset uses) is loaded, partitioned and trained through the app's real
ServerApp and ClientApp with the SGD optimizer; a hub name reaches flwr-datasets as
given; classes and image shape come from the data; every bad value is refused naming
its key."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from flwr.app import Context, RecordDict
from PIL import Image

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import data_identity, load_client_data, num_classes
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.inprocess import InProcessGrid
from drdfl_flwr.server_app import app as SERVER_APP
from tests.test_data import fresh_caches

NODES = 3
CLASSES = 3
BY_NAME = {"image_column": "pixels", "label_column": "target"}


def tiny_images(n: int, size: int = 8, seed: int = 0, mode: str = "RGB") -> list[Image.Image]:
    """Class k's images are brighter with k (a learnable signal) plus noise."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    images = []
    for i in range(n):
        k = i % CLASSES
        pixels = 0.15 + 0.3 * k + 0.2 * rng.random((size, size, channels))
        array = (pixels * 255).astype(np.uint8)
        images.append(Image.fromarray(array if channels == 3 else array[..., 0], mode))
    return images


def tiny_parquet(folder: Path, labels=None, n_train: int = 60, n_test: int = 30) -> Path:
    """train.parquet and test.parquet in the hub's layout (images as the hub stores
    them), ``pixels`` and ``target`` columns; ``labels(n)`` replaces the labels 0..2."""
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        targets = labels(n) if labels else [i % CLASSES for i in range(n)]
        Dataset.from_dict({"pixels": tiny_images(n, seed=n), "target": targets}).cast_column(
            "pixels", ImageFeature()
        ).to_parquet(str(folder / f"{split}.parquet"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_parquet(tmp_path_factory.mktemp("data") / "tiny")


def by_name(folder: Path, **changes) -> RunConfig:
    values = {"dataset": "tiny", "data_dir": str(folder), "partitioner": "iid", **BY_NAME}
    return RunConfig(**{**values, **changes})


def test_a_parquet_folder_by_name_and_columns_is_loaded_and_partitioned(tiny):
    cfg = by_name(tiny)
    parts = [load_client_data(cfg, p, NODES) for p in range(NODES)]
    assert num_classes(cfg) == CLASSES
    assert all(p.num_classes == CLASSES and p.input_shape == (3, 8, 8) for p in parts)
    assert sum(len(p.y_train) for p in parts) == 60
    assert sorted(set(parts[0].y_global_test.tolist())) == [0, 1, 2]
    assert float(parts[0].x_train.min()) >= -1.0 and float(parts[0].x_train.max()) <= 1.0
    identity = data_identity(cfg)
    assert identity["dataset"] == "tiny" and identity["splits"]["train"]["rows"] == 60


def test_image_bytes_without_the_hubs_feature_metadata_decode_alike(tiny, tmp_path):
    """A parquet file written by pyarrow alone holds ``{"bytes", "path"}`` structs, not
    images: decoded to the same pixels."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for split in ("train", "test"):
        hub = Dataset.from_parquet(str(tiny / f"{split}.parquet")).cast_column(
            "pixels", ImageFeature(decode=False)
        )
        table = pa.table(
            {
                "pixels": pa.array(
                    [{"bytes": im["bytes"], "path": None} for im in hub["pixels"]],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                ),
                "target": pa.array(hub["target"], pa.int64()),
            }
        )
        pq.write_table(table, folder / f"{split}.parquet")
    plain = load_client_data(by_name(folder, dataset="plain"), 0, NODES)
    reference = load_client_data(by_name(tiny), 0, NODES)
    assert plain.x_train.shape == reference.x_train.shape
    assert np.array_equal(plain.x_global_test.numpy(), reference.x_global_test.numpy())


@pytest.mark.parametrize("method", ["drdfl", "fedavg"])
def test_the_apps_train_a_dataset_given_by_name_with_sgd(method, tiny, tmp_path):
    """The app's ServerApp (relay for DRDFL, hub for FedAvg) drives its real ClientApp on
    every node over the test-made dataset, with SGD, momentum and a cosine schedule."""
    results = tmp_path / "results"
    cfg = by_name(
        tiny,
        method=method,
        num_server_rounds=2,
        local_epochs=1,
        batch_size=16,
        learning_rate=0.05,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=1e-4,
        lr_schedule="cosine",
        results_dir=str(results),
        run_name="run",
    )
    run_id = zlib.crc32(f"by-name-{method}".encode())
    grid = InProcessGrid(cfg.to_run_config(), NODES, run_id=run_id)
    SERVER_APP(
        grid,
        Context(
            run_id=run_id,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config=cfg.to_run_config(),
        ),
    )
    run_dir = results / "run"
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["failed"] == [] and len(record["nodes"]) == NODES
        for node in record["nodes"].values():
            assert 0.0 <= node["local_t_acc"] <= 1.0 and 0.0 <= node["global_t_acc"] <= 1.0
            assert node["optimizer_steps"] > 0
    recorded = json.loads((run_dir / "run_config.json").read_text())
    assert recorded["dataset"] == "tiny" and recorded["label-column"] == "target"
    assert recorded["optimizer"] == "sgd" and recorded["lr-schedule"] == "cosine"


def labelled(label_feature, labels, image_mode: str = "L", size: int = 12) -> Dataset:
    features = Features({"image": ImageFeature(), "label": label_feature})
    images = tiny_images(len(labels), size=size, mode=image_mode)
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_a_hub_name_reaches_flwr_datasets_and_its_class_label_gives_the_classes(monkeypatch):
    """A name on the hub is what FederatedDataset gets, with the subset and the run's
    seed; a class-label feature's count is the number of classes (5 here, though the
    data holds 3 of them); grayscale images make one channel."""
    fresh_caches(monkeypatch)
    asked = []

    class FakeHub:
        def __init__(self, dataset, subset, partitioners, shuffle, seed):
            asked.append((dataset, subset, shuffle, seed))

        def load_split(self, name):
            n = 30 if name == "train" else 12
            return labelled(ClassLabel(num_classes=5), [i % 3 for i in range(n)])

    import flwr_datasets

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeHub)
    cfg = RunConfig(
        dataset="someone/shapes",
        dataset_subset="small",
        image_column="image",
        label_column="label",
        partitioner="iid",
        seed=3,
    )
    client = load_client_data(cfg, 0, 2)
    assert asked[0] == ("someone/shapes", "small", True, 3)
    assert client.num_classes == 5 and client.input_shape == (1, 12, 12)
    assert data_identity(cfg) == {
        "dataset": "someone/shapes",
        "source": "someone/shapes",
        "subset": "small",
    }


def test_a_built_in_dataset_may_name_another_label_column(monkeypatch):
    """CIFAR-100's 20 coarse classes: the classes are read from the data, not the 100 of
    ``fine_label``."""
    fresh_caches(monkeypatch)

    class FakeHub:
        def __init__(self, dataset, subset, partitioners, shuffle, seed):
            assert dataset == "uoft-cs/cifar100"

        def load_split(self, name):
            n = 40
            images = tiny_images(n, size=32)
            return Dataset.from_dict(
                {
                    "img": images,
                    "fine_label": [i % 10 for i in range(n)],
                    "coarse_label": [i % 4 for i in range(n)],
                }
            )

    import flwr_datasets

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeHub)
    coarse = RunConfig(dataset="cifar100", label_column="coarse_label", partitioner="iid")
    assert load_client_data(coarse, 0, 2).num_classes == 4
    fine = RunConfig(dataset="cifar100", partitioner="iid")
    assert load_client_data(fine, 0, 2).num_classes == 100  # the built-in count, as before


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"dataset": "mnist"}, "dataset"),  # no owner/, no data-dir: not a hub name
        ({"dataset": "cifar-10"}, "dataset"),
        ({"dataset": "owner/bad name"}, "dataset"),
        ({"dataset": "someone/shapes"}, "image-column"),
        ({"dataset": "someone/shapes", "image_column": "image"}, "label-column"),
        (
            {"dataset": "someone/shapes", "image_column": "x", "label_column": "x"},
            "label-column",
        ),
    ],
)
def test_a_bad_dataset_value_is_refused_by_its_key_at_start_up(changes, key):
    with pytest.raises(ConfigError) as err:
        RunConfig(**changes)
    assert err.value.key == key


def test_a_typo_of_a_built_in_name_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        RunConfig(dataset="cifar1O")


@pytest.mark.parametrize(
    ("labels", "changes", "key", "reason"),
    [
        (None, {"label_column": "label"}, "label-column", "no such column"),
        (None, {"image_column": "img"}, "image-column", "['pixels', 'target']"),
        (lambda n: [0.5 * (i % 3) for i in range(n)], {}, "label-column", "float"),
        (lambda n: [f"class{i % 3}" for i in range(n)], {}, "label-column", "string"),
        (lambda n: [i % 3 - 1 for i in range(n)], {}, "label-column", "negative label -1"),
        (lambda n: [0] * n, {}, "label-column", "one class"),
    ],
)
def test_bad_data_is_refused_naming_the_column(tmp_path, labels, changes, key, reason):
    folder = tiny_parquet(tmp_path / "bad", labels=labels)
    with pytest.raises(ConfigError, match=reason) as err:
        load_client_data(by_name(folder, **changes), 0, NODES)
    assert err.value.key == key


def test_images_of_different_sizes_are_refused_naming_the_column(tmp_path):
    folder = tmp_path / "sizes"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 6)):
        images = tiny_images(n, size=8)[: n // 2] + tiny_images(n - n // 2, size=10)
        Dataset.from_dict({"pixels": images, "target": [i % 3 for i in range(n)]}).to_parquet(
            str(folder / f"{split}.parquet")
        )
    with pytest.raises(ConfigError, match="resize") as err:
        load_client_data(by_name(folder), 0, 2)
    assert err.value.key == "image-column"


def test_grayscale_beside_colour_images_make_three_channels(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 6)):
        images = tiny_images(n // 2, mode="L") + tiny_images(n - n // 2, mode="RGB")
        Dataset.from_dict({"pixels": images, "target": [i % 3 for i in range(n)]}).to_parquet(
            str(folder / f"{split}.parquet")
        )
    assert load_client_data(by_name(folder), 0, 2).input_shape == (3, 8, 8)


def test_a_hub_dataset_without_a_test_split_is_refused(monkeypatch):
    fresh_caches(monkeypatch)

    class FakeHub:
        def __init__(self, **kwargs):
            pass

        def load_split(self, name):
            if name == "test":
                raise ValueError("The given split: 'test' is not present in the dataset")
            return labelled(Value("int64"), [i % 3 for i in range(20)])

    import flwr_datasets

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeHub)
    cfg = RunConfig(dataset="someone/trainonly", image_column="image", label_column="label")
    with pytest.raises(ConfigError, match="no test split") as err:
        load_client_data(cfg, 0, 2)
    assert err.value.key == "dataset"


GRID = """
method = "fedavg"
dataset = "someone/shapes"
image-column = "image"
label-column = "label"
optimizer = "sgd"
momentum = 0.9
lr-schedule = "step"
[grid]
clients = 3
variants = "fedavg, local"
partitions = "someone/shapes/shard:2, iid"
"""


def test_a_grid_names_a_dataset_by_name_and_its_runs_and_files_are_file_safe(tmp_path):
    conf = tmp_path / "grid.toml"
    conf.write_text(GRID)
    grid = load_grid(conf)
    assert [run.run_id for run in grid.runs] == [
        "fedavg__someone_shapes__shard-2__seed42",
        "local__someone_shapes__shard-2__seed42",
        "fedavg__someone_shapes__iid__seed42",
        "local__someone_shapes__iid__seed42",
    ]
    assert all(run.cfg.optimizer == "sgd" and run.cfg.momentum == 0.9 for run in grid.runs)


def test_a_grid_dataset_from_data_root_by_a_plain_name(tmp_path, tiny):
    root = tmp_path / "root"
    root.mkdir()
    (root / "tiny").symlink_to(tiny)
    conf = tmp_path / "grid.toml"
    conf.write_text(GRID.replace("someone/shapes/", ""))
    grid = load_grid(
        conf,
        {
            "grid.datasets": "tiny",
            "grid.data-root": str(root),
            "image-column": "pixels",
            "label-column": "target",
        },
    )
    assert {run.cfg.data_dir for run in grid.runs} == {str(tiny.resolve())}
    with pytest.raises(ConfigError) as err:
        load_grid(conf, {"grid.datasets": "tiny"})  # no data-root: not a hub name either
    assert err.value.key == "grid.datasets"
