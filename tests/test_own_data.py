"""A device's own data, used whole (``own-data`` in its node config): the folders the
pre-split command writes give each node exactly the partition a simulation trains it on;
an image folder per class works as well; the ClientApp trains on each node's own folder,
whatever its size and classes; and a missing or malformed folder is refused naming the
node and the path."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from PIL import Image

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.experiments.presplit import main as presplit_main
from drdfl_flwr.inprocess import InProcessGrid
from drdfl_flwr.own_data import GLOBAL_TEST_KEY, OWN_DATA_KEY, OwnDataError, load_own_data
from drdfl_flwr.server_app import app as SERVER_APP

SPLIT = RunConfig(dataset="digits", partitioner="shard", classes_per_client=4)
SETTINGS = 'dataset="digits" partitioner="shard" classes-per-client=4'
FIELDS = ("x_train", "y_train", "x_local_test", "y_local_test", "x_global_test", "y_global_test")


@pytest.fixture(scope="module")
def devices(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("devices")
    assert presplit_main(["--num-partitions", "3", "--out", str(out), "--set", SETTINGS]) == 0
    return out


def test_presplit_folders_hold_exactly_the_simulated_partitions(devices):
    for partition in range(3):
        simulated = load_client_data(SPLIT, partition, 3)
        own = load_own_data(
            SPLIT, devices / f"node-{partition}", partition, devices / GLOBAL_TEST_KEY
        )
        for field in FIELDS:
            assert torch.equal(getattr(simulated, field), getattr(own, field)), field


def test_without_a_common_test_set_a_node_has_local_t_only(devices):
    own = load_own_data(SPLIT, devices / "node-1", 1)
    assert len(own.y_local_test) > 0 and len(own.y_global_test) == 0


def write_image_folder(root: Path, counts: dict[str, dict[int, int]], size=(8, 8)) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for label, n in per_class.items():
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size, dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


def test_an_image_folder_per_class_is_read_with_its_labels(tmp_path):
    write_image_folder(tmp_path, {"train": {2: 5, 7: 3}, "test": {2: 2, 7: 1}})
    own = load_own_data(SPLIT, tmp_path, 0)
    assert own.x_train.shape == (8, 1, 8, 8)
    assert sorted(own.y_train.tolist()) == [2] * 5 + [7] * 3
    assert own.y_local_test.tolist() == [2, 2, 7]
    assert own.x_train.min() >= -1.0 and own.x_train.max() <= 1.0


def bad_label_parquet(folder: Path) -> None:
    from datasets import Dataset

    folder.mkdir()
    rows = {"pixels": [np.zeros((8, 8), np.float32)] * 2, "label": [3, 12]}
    for split in ("train", "test"):
        Dataset.from_dict(rows).to_parquet(str(folder / f"{split}.parquet"))


@pytest.mark.parametrize(
    "make, said",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "neither train.parquet nor a train/ image folder"),
        (lambda p: (p / "train" / "cat").mkdir(parents=True), "named by its label"),
        (bad_label_parquet, r"labels \[12\] outside 0..9"),
        (
            lambda p: write_image_folder(p, {"train": {1: 2}, "test": {1: 1}}, size=(9, 9)),
            r"test images are \(1, 8, 8\)|training images",
        ),
    ],
)
def test_a_missing_or_malformed_folder_names_the_node_and_the_path(tmp_path, make, said):
    folder = tmp_path / "node"
    if said.startswith("test images"):
        write_image_folder(folder, {"train": {1: 2}})
        write_image_folder(folder, {"test": {1: 1}}, size=(9, 9))
    else:
        make(folder)
    with pytest.raises(OwnDataError, match=said) as raised:
        load_own_data(SPLIT, folder, 4)
    assert "partition-id 4" in str(raised.value) and str(folder) in str(raised.value)


@pytest.mark.parametrize("common_test", [True, False])
def test_each_node_trains_on_its_own_folder_through_the_apps(devices, tmp_path, common_test):
    """Three nodes, three different folders (different sizes and classes): the ServerApp
    over the ClientApps in process; every node's reported training examples are its
    folder's, and each is scored on its own test split and, where one is given, the
    common Global-T (without it the run reports Local-T alone, and finishes)."""
    cfg = RunConfig(
        method="fedavg" if common_test else "dfml",
        dataset="digits",
        num_server_rounds=1,
        local_epochs=1,
        results_dir=str(tmp_path),
        run_name="own",
        device="cpu",
    )
    run_id = zlib.crc32(f"own-data {common_test}".encode())
    grid = InProcessGrid(cfg.to_run_config(), 3, run_id=run_id)
    sizes = {}
    for context in grid.contexts.values():
        partition = int(context.node_config["partition-id"])
        context.node_config[OWN_DATA_KEY] = str(devices / f"node-{partition}")
        if common_test:
            context.node_config[GLOBAL_TEST_KEY] = str(devices / GLOBAL_TEST_KEY)
        sizes[str(partition)] = len(load_client_data(SPLIT, partition, 3).y_train)
    server = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    SERVER_APP(grid, server)
    record = json.loads((tmp_path / "own" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {p: n["num-examples"] for p, n in record["nodes"].items()} == sizes
    assert len(set(sizes.values())) == 3
    assert all(("global_t_acc" in n) == common_test for n in record["nodes"].values())
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert ("best_by_global_t_acc" in summary) == common_test
    assert summary["last"]["local_t_acc"]["mean"] > 0
