"""Per-round metrics on disk: ``metrics.jsonl``, ``summary.json``, ``convergence.png``.

Aggregates are the unweighted mean and standard deviation over clients, as the papers
report them. The summary holds the last round and the best round (by mean Local-T, and
separately by mean Global-T), each labelled, so nobody mistakes a peak for a final value.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from drdfl_flwr.atomic import append_line, write_atomically
from drdfl_flwr.health import health_view
from drdfl_flwr.provenance import write_provenance
from drdfl_flwr.scoring import GLOBAL_T, LOCAL_T, SCORE_KEYS
from drdfl_flwr.tracking import make_tracker
from strategies.rounds import AGGREGATE_PREFIX, RoundReport

ACCURACY_KEYS = (LOCAL_T, GLOBAL_T)  # the paper's two: the best rounds are picked by them
# a hub method's fresh aggregate, scored apart from the after-training accuracies
AGGREGATE_KEYS = tuple(AGGREGATE_PREFIX + key for key in SCORE_KEYS)


class ResultsWriter:
    def __init__(
        self,
        run_dir: Path,
        run_config: dict[str, Any],
        resume: bool = False,
        run_key: str | None = None,
    ) -> None:
        """``resume``: keep the rounds an interrupted run of the same config already wrote
        and append to them (see :meth:`completed_rounds`), and keep its run key (what the
        nodes' checkpoints are filed under); otherwise start afresh with ``run_key`` (a new
        one when not given)."""
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        key_path = run_dir / "run_key"
        self.rounds: list[dict[str, Any]] = []
        if resume and key_path.is_file():
            self.run_key = key_path.read_text().strip()
        else:
            self.run_key = run_key or uuid.uuid4().hex
            write_atomically(key_path, self.run_key)
        if resume:
            self.rounds = self._interrupted_rounds(run_config)
            # a half-written last line (the crash) is dropped: rewrite what was read, as
            # one atomic replace (a crash now keeps the old file, never half of it)
            write_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rounds))
        else:
            write_atomically(self.metrics_path, "")
        write_atomically(run_dir / "run_config.json", json.dumps(run_config, indent=2))
        write_provenance(run_dir)
        self.tracker = make_tracker(run_dir, run_config)
        if self.tracker is not None:
            for record in self.rounds:  # a resumed run: its tracker starts afresh, whole
                self.tracker.log_round(record)
        self.started = time.time()

    def _interrupted_rounds(self, run_config: dict[str, Any]) -> list[dict[str, Any]]:
        """The complete round records of an unfinished run with this very config; a clear
        error for anything else (a finished run, another config)."""
        if (self.run_dir / "summary.json").is_file():
            raise ValueError(
                f"resume: {self.run_dir} holds a finished run; choose another run-name"
            )
        saved_config = self.run_dir / "run_config.json"
        if saved_config.is_file():
            saved = json.loads(saved_config.read_text())
            changed = sorted(
                k
                for k in set(saved) | set(run_config)
                if k != "resume" and saved.get(k) != run_config.get(k)
            )
            if changed:
                raise ValueError(
                    f"resume: {self.run_dir} was written with other values of {changed}"
                )
        rounds = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if record.get("round") != len(rounds) + 1:
                    break
                rounds.append(record)
        return rounds

    @property
    def completed_rounds(self) -> int:
        return len(self.rounds)

    def log_report(self, report: RoundReport) -> None:
        """A finished round, written as its one serialization (``RoundReport.to_record``)."""
        self.log_round(report.to_record())

    def log_round(self, record: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` as it is read back (a round's record)."""
        self.rounds.append(record)
        append_line(self.metrics_path, json.dumps(record))
        if self.tracker is not None:
            self.tracker.log_round(record)

    def summary(self) -> dict[str, Any]:
        evaluated = [r for r in self.rounds if "local_t_acc" in r["mean"]]
        summary: dict[str, Any] = {
            "rounds": len(self.rounds),
            "wall_seconds": time.time() - self.started,
            "mean_seconds_per_round": _mean(r["seconds"] for r in self.rounds),
            "mean_bytes_sent_per_client_per_round": _mean(
                r["mean"].get("bytes_sent", 0.0) for r in self.rounds
            ),
            "mean_params_sent_per_client_per_round": _mean(
                r["mean"].get("params_sent", 0.0) for r in self.rounds
            ),
            "mean_bytes_received_per_client_per_round": _mean(
                r["mean"].get("bytes_received", 0.0) for r in self.rounds
            ),
            # compute parity (drdfl_flwr.learner.measured_fit)
            "mean_local_passes_per_client_per_round": _mean(
                r["mean"].get("local_passes", 0.0) for r in self.rounds
            ),
            "mean_optimizer_steps_per_client_per_round": _mean(
                r["mean"].get("optimizer_steps", 0.0) for r in self.rounds
            ),
            "topology": self.rounds[-1].get("topology", "") if self.rounds else "",
        }
        discovered = [r["discovery_seconds"] for r in self.rounds if "discovery_seconds" in r]
        if discovered:  # the (last) start's: a resumed run forms its ring again
            summary["discovery_seconds"] = discovered[-1]
        if self.rounds:
            # The last round's mechanism health, mean over nodes (see drdfl_flwr.health).
            summary["last_health"] = health_view(self.rounds[-1]["mean"])
        if evaluated:
            summary["last"] = _accuracy_view(evaluated[-1])
            for key in ACCURACY_KEYS:
                scored = [r for r in evaluated if key in r["mean"]]  # own data: no Global-T
                if scored:
                    best = max(scored, key=lambda r, k=key: r["mean"][k])
                    summary[f"best_by_{key}"] = _accuracy_view(best)
        return summary

    def finish(self) -> dict[str, Any]:
        summary = self.summary()
        write_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        if self.tracker is not None:
            self.tracker.close()
        self.plot()
        return summary

    def plot(self) -> None:
        """``convergence.png``, drawn on a bare Figure: no pyplot, so matplotlib's global
        backend (a notebook's inline one) is left alone."""
        from matplotlib.figure import Figure

        evaluated = [r for r in self.rounds if "local_t_acc" in r["mean"]]
        if not evaluated:
            return
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        rounds = [r["round"] for r in evaluated]
        for key, label in zip(ACCURACY_KEYS, ("Local-T", "Global-T"), strict=True):
            if not all(key in r["mean"] for r in evaluated):
                continue  # nodes on their own data without a common test set: no Global-T
            mean = np.array([r["mean"][key] for r in evaluated])
            std = np.array([r["std"][key] for r in evaluated])
            ax.plot(rounds, mean, marker="o", label=label)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (mean ± std over clients)")
        ax.set_title(self.run_dir.name)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / "convergence.png", dpi=120)


def _accuracy_view(record: dict[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = {"round": record["round"]}
    for key in SCORE_KEYS + AGGREGATE_KEYS:
        if key in record["mean"]:
            view[key] = {"mean": record["mean"][key], "std": record["std"][key]}
    return view


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0
