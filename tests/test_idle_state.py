"""``idle-state = "disk"``: a node's state waits between its rounds in a file, not in
Flower's in-memory context, and comes back exactly: bit for bit after sitting out, the
same run as with the state in memory, the folder gone when the run ends, and a file
changed or lost meanwhile is an error naming it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from drdfl_flwr.checkpoint import IDLE_STATE_FOLDER, StateFileError
from drdfl_flwr.client_app import STATE_KEY, restore, save
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.inprocess import simulate_in_process
from drdfl_flwr.node import node_round
from drdfl_flwr.registry import build_learner
from drdfl_flwr.warm import WARM
from strategies.wire import NUM_PARTITIONS, PARTITION_ID


def node_context(cfg: RunConfig, partition: int = 1) -> Context:
    return Context(
        run_id=7,
        node_id=100 + partition,
        node_config={PARTITION_ID: partition, NUM_PARTITIONS: 3},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


@pytest.fixture
def trained(tmp_path):
    """A DRDFL node after one trained round, saved with its state on disk."""
    cfg = RunConfig(method="drdfl", idle_state="disk", results_dir=str(tmp_path), device="cpu")
    context = node_context(cfg)
    data = load_client_data(cfg, 1, 3)
    learner = build_learner(cfg, data.input_shape, data.num_classes, 1)
    node_round(learner, [], data, 1, evaluate=False)
    save(context, learner, "run-a", "run-folder-1")
    return cfg, context, learner


def test_a_state_comes_back_bit_identical_and_the_context_holds_no_copy(trained, tmp_path):
    cfg, context, before = trained
    record = context.state.config_records[STATE_KEY]
    assert "blob" not in record and int(record["size"]) == len(before.to_bytes())
    path = Path(str(record["file"]))
    assert path == tmp_path / "run-folder-1" / IDLE_STATE_FOLDER / "partition-1.pt"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    WARM._entries.clear()  # the node's next turn, in another process: nothing warm
    _, learner, warm = restore(context, "run-a")
    assert not warm
    assert_bit_identical(learner.state_dict(), before.state_dict())


def assert_bit_identical(got, want, where="state") -> None:
    """Every tensor equal bit for bit (NaNs included), everything else equal."""
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), where
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_bit_identical(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_bit_identical(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("damage", ["changed", "removed"])
def test_a_state_file_changed_or_lost_while_idle_is_an_error_naming_it(trained, damage):
    _, context, _ = trained
    path = Path(str(context.state.config_records[STATE_KEY]["file"]))
    if damage == "changed":
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    else:
        path.unlink()
    WARM._entries.clear()
    with pytest.raises(StateFileError, match=str(path)):
        restore(context, "run-a")


def test_disk_state_without_a_folder_to_put_it_in_is_refused_by_name(tmp_path):
    cfg = RunConfig(method="local", idle_state="disk", results_dir=str(tmp_path), device="cpu")
    context = node_context(cfg)
    data = load_client_data(cfg, 1, 3)
    learner = build_learner(cfg, data.input_shape, data.num_classes, 1)
    with pytest.raises(ConfigError, match="idle-state"):
        save(context, learner, "run-a", "")


def test_an_unknown_idle_state_is_refused_by_name():
    with pytest.raises(ConfigError, match="idle-state"):
        RunConfig(idle_state="swap")


def test_a_run_with_idle_states_on_disk_is_the_run_with_them_in_memory(tmp_path):
    """8 nodes, 40 % taking part each round: idle nodes' files do not change while they
    sit out, every score equals the in-memory run's, and the folder is gone at the end."""
    base = RunConfig(
        method="drdfl",
        num_server_rounds=5,
        participation=0.4,
        local_epochs=1,
        subset_train=400,
        device="cpu",
        results_dir=str(tmp_path),
        warm_cache_mib=0,  # every turn restores from the saved state: the file, with "disk"
    )
    digests: dict[int, str] = {}
    unchanged_while_idle = []

    def watch(report) -> None:
        folder = next(tmp_path.glob(f"disk*/{IDLE_STATE_FOLDER}"))
        for file in folder.glob("partition-*.pt"):
            partition = int(file.stem.split("-")[1])
            now = hashlib.sha256(file.read_bytes()).hexdigest()
            if partition not in report.participants and partition in digests:
                unchanged_while_idle.append(now == digests[partition])
            digests[partition] = now

    summaries = {
        mode: simulate_in_process(
            base.replace(idle_state=mode, run_name=mode),
            8,
            on_round=watch if mode == "disk" else None,
            log_rounds=False,
        )
        for mode in ("memory", "disk")
    }
    assert unchanged_while_idle and all(unchanged_while_idle)
    assert summaries["disk"]["last"] == summaries["memory"]["last"]
    assert not (tmp_path / "disk" / IDLE_STATE_FOLDER).exists()
