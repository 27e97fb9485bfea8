"""A node's trained model kept in the results folder (``save-models = true``), and loaded
back as a learner that predicts.

The model is the node's own, personal, private state: it is written by the node, on the
node's disk, never sent. In simulation (and on SuperNodes sharing one host) that disk is
the results folder's, so the models sit beside ``metrics.jsonl`` in ``models/``; on real
devices each device keeps its own under its own ``results-dir``. The relay names the run's
results folder in every train message (``run-folder``), so a node files its model with the
run's records whatever name the run got.

A node writes its model after every round it trains (atomically: a crash keeps the
previous round's), so the file holds the node's last trained model even when it sat out
the final round (``participation`` < 1). The file holds the learner's whole state (its
modules and optimizers, as its checkpoint does), the run config and the data's shape, so
:func:`load_node_model` rebuilds the very learner: ``learner.predict(x)`` gives the
node's logits, ``learner.logits(x)`` in batches.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from drdfl_flwr.atomic import write_atomically
from drdfl_flwr.config import RunConfig
from drdfl_flwr.learner import Learner
from drdfl_flwr.registry import build_learner

MODELS_FOLDER = "models"
FORMAT = 1


def model_path(results_dir: str | Path, run_folder: str, partition_id: int) -> Path:
    """Where partition ``partition_id`` keeps its model of the run filed in ``run_folder``."""
    if not run_folder or Path(run_folder).name != run_folder:
        raise ValueError(f"run-folder {run_folder!r} must be a folder name, not a path")
    return model_file(Path(results_dir).expanduser() / run_folder, partition_id)


def model_file(run_dir: str | Path, partition_id: int) -> Path:
    """A partition's model file in a run's results folder."""
    return Path(run_dir).expanduser() / MODELS_FOLDER / f"node-{partition_id}.pt"


def save_node_model(
    path: Path,
    learner: Learner,
    server_round: int,
    input_shape: tuple[int, ...],
    run_config: dict[str, Any],
) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "partition_id": learner.partition_id,
            "round": server_round,
            "input_shape": tuple(input_shape),
            "num_classes": learner.num_classes,
            "run_config": dict(run_config),
            "state": learner.state_dict(),
        },
        buffer,
    )
    write_atomically(path, buffer.getvalue())


def saved_partitions(run_dir: str | Path) -> list[int]:
    """The partitions whose model ``run_dir`` holds, in order."""
    folder = Path(run_dir).expanduser() / MODELS_FOLDER
    return sorted(int(p.stem.removeprefix("node-")) for p in folder.glob("node-*.pt"))


def load_node_model(run_dir: str | Path, partition_id: int, device: str = "cpu") -> Learner:
    """The learner partition ``partition_id`` trained in the run filed in ``run_dir``, as
    it was after the last round it trained (``learner.rounds_trained`` says how many),
    on ``device``."""
    path = model_file(run_dir, partition_id)
    if not path.is_file():
        held = saved_partitions(run_dir)
        raise FileNotFoundError(
            f"no model of partition {partition_id} in {path.parent} "
            + (f"(it holds partitions {held})" if held else "(was the run made with save-models?)")
        )
    saved = torch.load(path, map_location=device, weights_only=False)
    if saved.get("format") != FORMAT:
        found = saved.get("format")
        raise ValueError(f"{path}: model format {found!r}, this version reads {FORMAT}")
    cfg = RunConfig.from_run_config({**saved["run_config"], "device": device})
    learner = build_learner(cfg, saved["input_shape"], saved["num_classes"], partition_id)
    learner.load_state_dict(saved["state"])
    return learner
