"""A grid's figures: Local-T convergence (the paper's Figure 3) and label distributions.

Figures are built as bare ``matplotlib.figure.Figure`` objects and saved with
``fig.savefig``, which needs no pyplot: the global backend is never touched and no
figure is left registered anywhere, so plotting from a notebook, a test or a runner
thread cannot change how anything else draws. Matplotlib is imported on first use only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from drdfl_flwr.experiments.grid import GridRun, Partition
from drdfl_flwr.experiments.outcomes import FAILED, RunOutcome

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120


def _figure(ncols: int, width: float = 4.6, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# -- convergence --------------------------------------------------------------------


def local_t_curve(outcome: RunOutcome) -> dict[int, float]:
    """Round -> mean Local-T over clients (percent), evaluated rounds only."""
    return {
        int(r["round"]): 100.0 * float(r["mean"]["local_t_acc"])
        for r in outcome.rounds
        if "local_t_acc" in r.get("mean", {})
    }


def mean_curve(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Several seeds' curves as one: at each round, the mean over the seeds that reached
    it, so a seed still running does not cut the others' curve short."""
    rounds = sorted({r for curve in curves for r in curve})
    means = [float(np.mean([c[r] for c in curves if r in c])) for r in rounds]
    return rounds, means


def convergence_plots(outcomes: Sequence[RunOutcome], out_dir: Path) -> list[Path]:
    """``convergence_<dataset>.png``: one panel per partition setting, one line per
    variant, mean Local-T per evaluated round (averaged over seeds). Failed runs and runs
    with no evaluated round yet are left out; a dataset with nothing to draw gets no file."""
    curves: dict[str, dict[Partition, dict[str, list[dict[int, float]]]]] = {}
    for o in outcomes:
        curve = local_t_curve(o) if o.status != FAILED else {}
        if curve:
            by_variant = curves.setdefault(o.run.dataset, {}).setdefault(o.run.partition, {})
            by_variant.setdefault(o.run.variant, []).append(curve)
    return [
        _convergence_figure(dataset, panels, Path(out_dir) / f"convergence_{dataset}.png")
        for dataset, panels in curves.items()
    ]


def _convergence_figure(
    dataset: str, panels: dict[Partition, dict[str, list[dict[int, float]]]], path: Path
) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(panels))
    for ax, (partition, by_variant) in zip(axes, panels.items(), strict=True):
        for variant, seed_curves in by_variant.items():
            rounds, means = mean_curve(seed_curves)
            label = variant if len(seed_curves) == 1 else f"{variant} ({len(seed_curves)} seeds)"
            ax.plot(rounds, means, marker="o", markersize=3, label=label)
        ax.set_title(f"{dataset}, {partition.label}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("Local-T accuracy (%), mean over clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


# -- label distributions ------------------------------------------------------------


def label_file_stem(run: GridRun) -> str:
    """``labels_<dataset>_<partition key, ':' as '-'>_seed<k>``: fixed by the grid alone."""
    return f"labels_{run.dataset}_{run.partition.key.replace(':', '-')}_seed{run.seed}"


def label_counts_csv(counts: np.ndarray) -> str:
    """Rows clients, columns classes, as integers."""
    header = ",".join(["client"] + [f"class {k}" for k in range(counts.shape[1])])
    rows = [",".join([str(m)] + [str(int(v)) for v in row]) for m, row in enumerate(counts)]
    return "\n".join([header, *rows]) + "\n"


def label_distribution_plots(
    grid_runs: Sequence[GridRun], out_dir: Path, num_partitions: int
) -> list[Path]:
    """For every distinct (dataset, partition, seed) among ``grid_runs``: a heatmap of
    training samples per client and class, and the counts as CSV. The counts come from
    :func:`drdfl_flwr.data.label_counts`, the same plan the clients load, so the figure
    shows the split the runs trained on. Loads the datasets (the hub's, unless cached)."""
    from drdfl_flwr.data import label_counts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    firsts: dict[tuple[str, str, int], GridRun] = {}
    for run in grid_runs:
        firsts.setdefault((run.dataset, run.partition.key, run.seed), run)
    paths = []
    for run in firsts.values():
        counts = label_counts(run.cfg, num_partitions)
        stem = label_file_stem(run)
        csv_path = out_dir / f"{stem}.csv"
        csv_path.write_text(label_counts_csv(counts), newline="\n")
        paths += [_label_figure(run, counts, out_dir / f"{stem}.png"), csv_path]
    return paths


def _label_figure(run: GridRun, counts: np.ndarray, path: Path) -> Path:
    clients, classes = counts.shape
    fig, (ax,) = _figure(1, width=max(4.6, 0.35 * classes + 2.0), height=max(3.0, 0.4 * clients))
    image = ax.imshow(counts, aspect="auto", cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="training samples")
    if classes <= 20 and clients <= 20:  # small enough to print every count
        threshold = counts.max() / 2 if counts.size else 0
        for m in range(clients):
            for k in range(classes):
                color = "white" if counts[m, k] > threshold else "black"
                ax.text(
                    k, m, str(int(counts[m, k])), ha="center", va="center", fontsize=7, color=color
                )
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_yticks(range(clients))
    if classes <= 20:
        ax.set_xticks(range(classes))
    ax.set_title(f"{run.dataset}, {run.partition.label}, seed {run.seed}")
    return _save(fig, path)
