"""Experiment tracking: every round's metrics, the run config and the health values,
written from the one place rounds are recorded (:class:`drdfl_flwr.results.ResultsWriter`),
so a tracker sees exactly what ``metrics.jsonl`` holds. Off by default (``tracking =
"none"``); ``"tensorboard"`` writes TensorBoard event files under the run's results folder
(``<run>/tensorboard``), offline, readable with ``tensorboard --logdir <results-dir>``.
TensorBoard is an optional dependency: ``pip install -e ".[tracking]"``.

Scalars are grouped as TensorBoard shows them: ``accuracy/`` (the scores, their floor and
standard errors, mean over nodes), ``health/`` and ``alarm/`` (the mechanism's), ``cost/``
(bytes, steps, seconds) and ``train/`` (the rest: losses). The std over nodes of every
accuracy is logged beside it as ``accuracy_std/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drdfl_flwr.config import ConfigError

COST_PREFIXES = ("bytes_", "params_", "time_", "optimizer_steps", "local_passes")


def tag(key: str) -> str:
    if key.startswith("health_"):
        return "health/" + key.removeprefix("health_")
    if key.startswith("alarm_"):
        return "alarm/" + key.removeprefix("alarm_")
    if key.endswith(("_acc", "_se")):
        return "accuracy/" + key
    if key.startswith(COST_PREFIXES):
        return "cost/" + key
    return "train/" + key


class TensorBoardTracker:
    def __init__(self, run_dir: Path, run_config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                "tracking",
                "tensorboard",
                f'needs the tensorboard package ({err}): pip install -e ".[tracking]"',
            ) from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        config = json.dumps(run_config, indent=2, sort_keys=True)
        self.writer.add_text("run_config", f"```\n{config}\n```", 0)

    def log_round(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in sorted(record.get("mean", {}).items()):
            self.writer.add_scalar(tag(key), float(value), step)
        for key, value in sorted(record.get("std", {}).items()):
            if key.endswith("_acc"):
                self.writer.add_scalar("accuracy_std/" + key, float(value), step)
        self.writer.add_scalar("cost/seconds_per_round", float(record.get("seconds", 0.0)), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tracker(run_dir: Path, run_config: dict[str, Any]) -> TensorBoardTracker | None:
    """The tracker the run config names (``tracking``), or None."""
    kind = run_config.get("tracking", "none")
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, run_config)
    return None
