"""A grid's figures: Local-T convergence (the paper's Figure 3), the headline bars, the
per-client personalization/generalization trade-off, and label distributions.

Figures are built as bare ``matplotlib.figure.Figure`` objects and saved with
``fig.savefig``, which needs no pyplot: the global backend is never touched and no
figure is left registered anywhere, so plotting from a notebook, a test or a runner
thread cannot change how anything else draws. Matplotlib is imported on first use only.

Every figure names variants by :func:`~drdfl_flwr.experiments.names.display_name`
(``DRDFL (isolated)``, not ``drdfl+isolated``) and draws them alike
(:func:`variant_styles`): one colour and marker per shared variant, its ``+isolated``
twin in the same colour, dashed or hatched. Accuracies are in percent; a spread over
seeds is the population std over seeds of the per-seed client mean, as ``tables.md``
gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from drdfl_flwr.experiments.grid import GridRun, Partition, file_safe
from drdfl_flwr.experiments.names import base_variant, display_name, is_isolated
from drdfl_flwr.experiments.outcomes import DONE, FAILED, RunOutcome
from drdfl_flwr.experiments.report import (
    VALUE,
    aggregate,
    columns,
    floor_cell,
    kinds,
    present_metrics,
    runs_in,
    seed_result,
)
from drdfl_flwr.experiments.stats import t_interval_half_width

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
# distinct hues; Local in dark grey (the reference every method is read against)
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#e6ab02",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#ff1493",
    "#7b4173",
    "#a6cee3",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
LOCAL_COLOR = "#4d4d4d"
WHITE_SNAP = 246  # palette entries this close to white are saved as white
ACCURACY = {"local_t_acc": "Local-T accuracy (%)", "global_t_acc": "Global-T accuracy (%)"}
# the headline's two panels: the full-test-set readings where the runs have them
HEADLINE = {
    "expected_local_t_acc": "expected Local-T accuracy (%)",
    "global_t_balanced_acc": "balanced Global-T accuracy (%)",
}


def _figure(
    ncols: int, width: float = 4.6, height: float = 3.6, nrows: int = 1, **kwargs: Any
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure of ``nrows`` x ``ncols`` panels of ``width`` x
    ``height`` inches; the axes as a 1-D array for one row, 2-D otherwise."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes[0] if nrows == 1 else axes


def save_png(fig: Figure, path: Path, dpi: int = DPI, quantize: bool = True) -> Path:
    """A PNG of 256 colours (Pillow's fast octree keeps every line colour; the files are
    about a third of the size of full-colour ones, so committed reports stay small).
    Keep fills that must show away from white (below :data:`WHITE_SNAP`). ``quantize =
    False`` saves all colours, for a continuous colour scale."""
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if not quantize:  # a continuous colour scale (a heatmap's) would show 256 steps
        fig.savefig(path, dpi=dpi, facecolor="white")
        return path
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as image:
        quantized = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    # the octree averages white with the near-white antialiasing around it: the background
    # must stay pure white (255), so entries within a few levels of it are set to it
    colors = quantized.getpalette() or []
    for k in range(0, len(colors) - 2, 3):
        if min(colors[k : k + 3]) >= WHITE_SNAP:
            colors[k : k + 3] = [255, 255, 255]
    quantized.putpalette(colors)
    quantized.save(path, format="PNG", optimize=True)
    return path


def ordered_variants(variants: Sequence[str]) -> list[str]:
    """Grid order, with every ``+isolated`` twin moved right after its shared variant
    (where the grid has that variant), so the two are read side by side."""
    chosen = list(dict.fromkeys(variants))
    ordered = []
    for variant in chosen:
        if is_isolated(variant) and base_variant(variant) in chosen:
            continue  # placed beside its shared variant
        ordered.append(variant)
        twin = next((v for v in chosen if is_isolated(v) and base_variant(v) == variant), None)
        if twin is not None:
            ordered.append(twin)
    return ordered


def variant_styles(variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Variant -> ``color``, ``marker``, ``linestyle``, ``hatch``, ``isolated``: one
    colour and marker per shared variant (grid order; Local dark grey), its isolated twin the
    same colour, dashed, hatched and hollow."""
    styles: dict[str, dict[str, Any]] = {}
    bases = list(dict.fromkeys(base_variant(v) for v in variants))
    coloured = [b for b in bases if b != "local"]
    for variant in variants:
        base = base_variant(variant)
        if base == "local":
            color, marker = LOCAL_COLOR, "o"
        else:
            k = coloured.index(base)
            color, marker = PALETTE[k % len(PALETTE)], MARKERS[k % len(MARKERS)]
        isolated = is_isolated(variant)
        styles[variant] = {
            "color": color,
            "marker": marker,
            "linestyle": "--" if isolated else "-",
            "hatch": "///" if isolated else None,
            "isolated": isolated,
        }
    return styles


def _legend_outside(
    fig: Figure,
    handles: list,
    labels: list[str],
    title: str = "",
    loc: str = "outside right upper",
) -> None:
    """One legend for the whole figure, right of every panel: it never covers a curve."""
    fig.legend(
        handles,
        labels,
        loc=loc,
        fontsize="small",
        title=title or None,
        title_fontsize="small",
        frameon=False,
    )


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


def spread_curve(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float]]:
    """At each round, the population std over the seeds that reached it (0 for one)."""
    rounds = sorted({r for curve in curves for r in curve})
    spreads = [float(np.std([c[r] for c in curves if r in c])) for r in rounds]
    return rounds, spreads


def convergence_plots(outcomes: Sequence[RunOutcome], out_dir: Path) -> list[Path]:
    """``convergence_<dataset>.png``: one panel per partition setting, one line per
    variant, mean Local-T per evaluated round (averaged over seeds, with a band of ± std
    over seeds where there are several). Failed runs and runs with no evaluated round yet
    are left out; a dataset with nothing to draw gets no file."""
    curves: dict[str, dict[Partition, dict[str, list[dict[int, float]]]]] = {}
    for o in outcomes:
        curve = local_t_curve(o) if o.status != FAILED else {}
        if curve:
            by_variant = curves.setdefault(o.run.dataset, {}).setdefault(o.run.partition, {})
            by_variant.setdefault(o.run.variant, []).append(curve)
    styles = variant_styles(ordered_variants([o.run.variant for o in outcomes]))
    return [
        _convergence_figure(
            dataset, panels, styles, Path(out_dir) / f"convergence_{file_safe(dataset)}.png"
        )
        for dataset, panels in curves.items()
    ]


def _convergence_figure(
    dataset: str,
    panels: dict[Partition, dict[str, list[dict[int, float]]]],
    styles: dict[str, dict[str, Any]],
    path: Path,
) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(panels), width=6.4 if len(panels) == 1 else 4.8, height=4.4)
    legend: dict[str, Any] = {}
    seeds = max(len(c) for by_variant in panels.values() for c in by_variant.values())
    for ax, (partition, by_variant) in zip(axes, panels.items(), strict=True):
        for variant in ordered_variants(list(by_variant)):
            seed_curves, style = by_variant[variant], styles[variant]
            rounds, means = mean_curve(seed_curves)
            (line,) = ax.plot(
                rounds,
                means,
                color=style["color"],
                linestyle=style["linestyle"],
                marker=style["marker"],
                markersize=3.5,
                markerfacecolor="white" if style["isolated"] else style["color"],
                linewidth=1.3,
            )
            if len(seed_curves) > 1:
                _, spreads = spread_curve(seed_curves)
                low, high = np.subtract(means, spreads), np.add(means, spreads)
                ax.fill_between(rounds, low, high, color=style["color"], alpha=0.08, linewidth=0)
            legend.setdefault(variant, line)
        ax.set_title(f"{dataset}, {partition.label}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("Local-T accuracy (%), mean over clients")
        ax.grid(alpha=0.3)
    order = [v for v in ordered_variants(list(legend))]
    title = f"mean over {seeds} seeds,\nband ± std over seeds" if seeds > 1 else "one seed"
    _legend_outside(fig, [legend[v] for v in order], [display_name(v) for v in order], title)
    return save_png(fig, path)


def report_figures(outcomes: Sequence[RunOutcome], out_dir: Path) -> list[Path]:
    """The figures of ``tables.md``'s numbers (``report.write_report``): ``headline.png``
    (the last-round table as bars, over seeds) and ``tradeoff.png`` (every client's
    Local-T against its Global-T; one ``tradeoff_<dataset>_<partition>.png`` per column
    where there are several); returns the paths written."""
    return headline_plot(outcomes, out_dir) + tradeoff_plots(outcomes, out_dir)


# -- headline: accuracy per variant, over seeds ------------------------------------------


def _accuracy_columns(outcomes: Sequence[RunOutcome]) -> list[Any]:
    return [column for kind in kinds(outcomes) for column in columns(outcomes, kind)]


def headline_plot(outcomes: Sequence[RunOutcome], out_dir: Path) -> list[Path]:
    """``headline.png``: per variant, bars of mean Local-T (left) and Global-T (right)
    at the last round, the means of ``tables.md``'s last-round table: with several seeds
    the mean over seeds of the client mean, whiskers its 95 % t-interval over the seeds
    (mean ± t(0.975, n-1) s / sqrt(n), s the sample std of the n seeds' values: the
    interval of the paired comparisons), one dot per seed; with one seed the client mean
    ± std over clients. Each shared variant sits right above its hatched ``+isolated``
    twin; a dotted line marks Local. One row of panels per (dataset, partition setting).
    No file while no run has finished."""

    columns_ = _accuracy_columns(outcomes)
    if not any(o.status == DONE and o.summary for o in outcomes):
        return []
    names = ordered_variants([o.run.variant for o in outcomes])
    styles = variant_styles(names)
    # the seeds that finished (a grid part way through has fewer than it lists)
    seeds = max(
        len({o.run.seed for o in outcomes if o.run.variant == v and o.status == DONE})
        for v in names
    )
    fig, axes = _figure(
        2, width=4.6, height=max(2.4, 0.25 * len(names) + 1.1), nrows=len(columns_), sharey=True
    )
    axes = np.atleast_2d(axes)
    y = np.arange(len(names))
    present = {key for key, _ in present_metrics(outcomes)}
    panels = HEADLINE if set(HEADLINE) <= present else ACCURACY
    for row, column in zip(axes, columns_, strict=True):
        cells = {v: aggregate(runs_in(outcomes, v, column), "last") for v in names}
        floor = floor_cell(outcomes, column, "last")
        for ax, (key, label) in zip(row, panels.items(), strict=True):
            top = 0.0
            for i, variant in enumerate(names):
                cell, style = cells[variant], styles[variant]
                if cell.state != VALUE or key not in cell.mean:
                    text = "failed" if cell.state == FAILED else "no result"
                    ax.text(1, i, text, va="center", fontsize=7, color="0.4")
                    continue
                mean, spread = cell.mean[key], cell.std[key]  # one seed: std over clients
                points = [
                    r.mean[key]
                    for o in runs_in(outcomes, variant, column)
                    if (r := seed_result(o, "last")) is not None and key in r.mean
                ]
                if len(points) > 1:
                    spread = t_interval_half_width(points)
                ax.barh(
                    i,
                    mean,
                    height=0.75,
                    color=style["color"],
                    alpha=0.35 if style["isolated"] else 0.85,
                    hatch=style["hatch"],
                    edgecolor=style["color"],
                    linewidth=0.8,
                )
                ax.errorbar(mean, i, xerr=spread, color="black", capsize=2.5, linewidth=0.9)
                if len(points) > 1:
                    jitter = np.linspace(-0.2, 0.2, len(points))
                    ax.scatter(points, i + jitter, s=7, color="black", zorder=3, linewidths=0)
                end = max(mean + spread, *points)
                ax.text(end, i, f" {mean:.1f}", va="center", fontsize=7, color="0.15")
                top = max(top, end)
            local = cells.get("local")
            if local is not None and local.state == VALUE and key in local.mean:
                ax.axvline(local.mean[key], color="0.3", linestyle=":", linewidth=1)
            if floor.state == VALUE and key in floor.mean:
                ax.axvline(floor.mean[key], color="tab:red", linestyle="--", linewidth=1)
            ax.set_xlim(0, max(10.0, top * 1.15 + 4))
            ax.set_xlabel(label)
            ax.set_title(f"{column.name}: {label.removesuffix(' accuracy (%)')}", fontsize="medium")
            ax.grid(axis="x", alpha=0.3)
        row[0].set_yticks(y, [display_name(v) for v in names])
    axes[0, 0].set_ylim(len(names) - 0.5, -0.6)  # shared by every panel: grid order, top down
    spread_text = (
        f"Bars: mean over {seeds} seeds of the client mean (the number printed);\n"
        "whiskers: 95 % t-interval over the seeds (mean ± t(0.975, n-1) s/√n, s the sample "
        "std); dots: the seeds."
        if seeds > 1
        else "Bars: client mean, one seed (the number printed);\nwhiskers: ± std over clients."
    )
    fig.suptitle(
        f"Accuracy at the last round. {spread_text}\nHatched: the isolated twin (sharing "
        "cut off). Dotted line: Local. Dashed red line: the majority-class floor.",
        fontsize="medium",
    )
    return [save_png(fig, Path(out_dir) / "headline.png", dpi=110)]


# -- trade-off: per-client Local-T against Global-T ------------------------------------


def last_node_accuracies(outcome: RunOutcome) -> list[tuple[float, float]]:
    """(Local-T, Global-T) in percent of every node at the run's last round that
    evaluated them, from ``metrics.jsonl``'s per-node records."""
    for record in reversed(outcome.rounds):
        nodes = record.get("nodes", {})
        points = [
            (100.0 * float(m["local_t_acc"]), 100.0 * float(m["global_t_acc"]))
            for m in nodes.values()
            if "local_t_acc" in m and "global_t_acc" in m
        ]
        if points:
            return points
    return []


def tradeoff_file_stem(dataset: str, partition: Partition, only: bool = False) -> str:
    """``tradeoff`` for a grid of one (dataset, partition) column, else
    ``tradeoff_<dataset>_<partition key, ':' as '-'>``."""
    return (
        "tradeoff" if only else f"tradeoff_{file_safe(dataset)}_{partition.key.replace(':', '-')}"
    )


def tradeoff_plots(outcomes: Sequence[RunOutcome], out_dir: Path) -> list[Path]:
    """``tradeoff.png`` (one per column, ``tradeoff_<dataset>_<partition>.png``, where the
    grid has several (dataset, partition) columns): per client, Local-T (its own test split)
    against Global-T (the common test set) at the last round, every seed of every
    finished run: one small panel per variant, the other variants' clients in grey
    behind, the variant's mean as a large marker. Personalization is up, generalization
    right. No file for a column without a finished run with per-node accuracies."""
    names = ordered_variants([o.run.variant for o in outcomes])
    styles = variant_styles(names)
    paths, columns_ = [], _accuracy_columns(outcomes)
    for column in columns_:
        points: dict[str, dict[int, list[tuple[float, float]]]] = {}
        for o in outcomes:
            same = (o.run.dataset, o.run.partition) == (column.dataset, column.partition)
            if same and o.status == DONE and (nodes := last_node_accuracies(o)):
                points.setdefault(o.run.variant, {})[o.run.seed] = nodes
        if points:
            stem = tradeoff_file_stem(column.dataset, column.partition, len(columns_) == 1)
            shown = [v for v in names if v in points]
            paths.append(_tradeoff_figure(column.name, shown, points, styles, out_dir, stem))
    return paths


def _tradeoff_figure(
    title: str,
    names: list[str],
    points: dict[str, dict[int, list[tuple[float, float]]]],
    styles: dict[str, dict[str, Any]],
    out_dir: Path,
    stem: str,
) -> Path:
    ncols = min(len(names), 5)
    nrows = -(-len(names) // ncols)
    height = {1: 3.4, 2: 2.7}.get(nrows, 2.2)  # room for the shared axis labels
    width = (1.85 * ncols + 2.4) / ncols  # panels of 1.85 in, and 2.4 in for the legend
    fig, axes = _figure(ncols, width, height, nrows=nrows, sharex=True, sharey=True)
    axes = np.atleast_2d(axes)
    every = np.array([p for by_seed in points.values() for s in by_seed.values() for p in s])
    seeds = sorted({s for by_seed in points.values() for s in by_seed})
    seed_markers = dict(zip(seeds, MARKERS, strict=False))
    top_x = min(100.0, max(10.0, float(every[:, 1].max()) * 1.1 + 2))
    for ax, variant in zip(axes.flat, names, strict=False):
        style = styles[variant]
        ax.scatter(every[:, 1], every[:, 0], s=5, color="0.82", linewidths=0, zorder=1)
        ax.plot([0, 100], [0, 100], color="0.6", linestyle=":", linewidth=0.8, zorder=1)
        mine = []
        for seed, nodes in sorted(points[variant].items()):
            array = np.array(nodes)
            mine.append(array)
            ax.scatter(
                array[:, 1],
                array[:, 0],
                s=13,
                marker=seed_markers[seed],
                facecolor="none" if style["isolated"] else style["color"],
                edgecolor=style["color"],
                alpha=0.75,
                linewidths=0.8,
                zorder=2,
            )
        local, global_ = np.concatenate(mine).mean(axis=0)
        ax.scatter(
            global_, local, s=70, marker="D", color=style["color"], edgecolor="black", zorder=3
        )
        ax.set_title(
            f"{display_name(variant)}\n{local:.1f} / {global_:.1f}", fontsize="small", pad=3
        )
        ax.grid(alpha=0.25)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
        # the panel above an empty slot is the lowest of its column: it shows the ticks
        above = axes.flat[list(axes.flat).index(ax) - ncols]
        above.xaxis.set_tick_params(labelbottom=True)
    axes[0, 0].set_xlim(-1, top_x)
    top_y = min(100.0, max(20.0, float(every[:, 0].max()) * 1.08 + 2))
    axes[0, 0].set_ylim(-0.03 * top_y, top_y + 0.03 * top_y)
    fig.supxlabel("Global-T accuracy (%), on the common test set")
    fig.supylabel("Local-T accuracy (%), own test split")
    from matplotlib.lines import Line2D

    key = {"color": "0.3", "linestyle": "none"}
    entries = [
        (Line2D([], [], marker=seed_markers[s], markersize=5, **key), f"a client, seed {s}")
        for s in seeds
    ]
    if any(styles[v]["isolated"] for v in names):
        marker = Line2D([], [], marker="o", markersize=5, markerfacecolor="none", **key)
        entries.append((marker, "hollow: isolated twin"))
    mean = Line2D([], [], marker="D", markersize=7, markeredgecolor="black", **key)
    entries.append((mean, "mean over clients and\nseeds (in the title:\nLocal-T / Global-T)"))
    if len(names) > 1:
        others = Line2D([], [], marker="o", markersize=4, color="0.82", linestyle="none")
        entries.append((others, "every other variant's\nclients"))
    entries.append((Line2D([], [], color="0.6", linestyle=":"), "Local-T = Global-T"))
    handles, labels = [h for h, _ in entries], [label for _, label in entries]
    _legend_outside(fig, handles, labels, loc="outside right center")
    fig.suptitle(f"{title}: every client at the last round, per variant", fontsize="medium")
    return save_png(fig, Path(out_dir) / f"{stem}.png", dpi=110)


# -- label distributions ------------------------------------------------------------


def label_file_stem(run: GridRun) -> str:
    """``labels_<dataset>_<partition key, ':' as '-'>_seed<k>``: fixed by the grid alone."""
    return f"labels_{file_safe(run.dataset)}_{run.partition.key.replace(':', '-')}_seed{run.seed}"


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
    # at most 9.5 in wide (CIFAR-100's 100 classes too): readable at a README's width
    width = min(9.5, max(4.6, 0.35 * classes + 2.0))
    fig, (ax,) = _figure(1, width=width, height=max(3.0, 0.4 * clients))
    image = ax.imshow(counts, aspect="auto", cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="images")
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
    return save_png(fig, path, quantize=False)
