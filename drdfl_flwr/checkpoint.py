"""A node's private state on its own disk, so that a SuperNode that crashed and restarted
resumes where it was.

Flower keeps ``context.state`` in the SuperNode process; a restarted SuperNode starts
with an empty one (and a new node id). When the node config names a ``checkpoint-dir``,
the ClientApp writes the learner's state there after every round it trains, keyed by
the run key the relay puts in every message (the Flower run id of the run that started
the results folder, so a resumed run, which gets a new run id, finds the same
checkpoints, and another run never does) and by partition, and reads it back when
``context.state`` is empty.
The same folder holds the node's decoded partition (``data/``), so that a fresh
ClientApp process does not partition and decode the dataset again. Nothing here ever
leaves the node.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.app import Context

from drdfl_flwr.atomic import write_atomically

NODE_CONFIG_KEY = "checkpoint-dir"


def node_folder(context: Context) -> Path | None:
    """The node's ``checkpoint-dir``, or None when its node config names none."""
    folder = context.node_config.get(NODE_CONFIG_KEY)
    return Path(str(folder)).expanduser() if folder else None


def checkpoint_path(context: Context, partition_id: int, run_key: str) -> Path | None:
    """Where ``run_key``'s state of this partition lives, or None without a checkpoint-dir."""
    folder = node_folder(context)
    if folder is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run_key)
    return folder / f"run-{safe}" / f"partition-{partition_id}.pt"


def data_cache_dir(context: Context) -> Path | None:
    """Where the node keeps its decoded partition (``<checkpoint-dir>/data``), if anywhere."""
    folder = node_folder(context)
    return folder / "data" if folder is not None else None


def write_checkpoint(path: Path, blob: bytes) -> None:
    """Atomically: a crash while writing leaves the previous checkpoint intact."""
    write_atomically(path, blob)


def read_checkpoint(path: Path | None) -> bytes | None:
    if path is None or not path.is_file():
        return None
    return path.read_bytes()


IDLE_STATE_FOLDER = "node-state"  # under the run's folder: idle-state = "disk" in simulation


class StateFileError(RuntimeError):
    """A node's state file (``idle-state = "disk"``) is missing or not what it wrote."""


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def read_state_file(path: Path, sha256: str) -> bytes:
    """The state a node wrote to ``path``, checked against the digest it kept: a file
    changed or removed while the node sat out is an error, never a silently different
    model."""
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise StateFileError(f"the node's state file {path} cannot be read: {err}") from None
    if digest(blob) != sha256:
        raise StateFileError(
            f"the node's state file {path} changed while the node sat out (SHA-256 "
            f"{digest(blob)[:12]}..., written as {sha256[:12]}...)"
        )
    return blob
