"""A grid's tables, in the paper's layouts, as Markdown and CSV.

Everything here is a pure function of the runs' outcomes (:mod:`.outcomes`), so a
report can be rebuilt at any time, from a finished or a half-finished grid. The tables
and CSV files hold no timing, no timestamps and no absolute paths: two grids that ran
the same seeds to the same results write byte-identical files, which makes a report
something to diff. Timing goes to its own ``timing.md``.

Layout (the paper's Tables 2 and 3): one row per variant, one column group per
(dataset, partition setting), each with Local-T and Global-T, cells ``mean ± std`` in
percent. With one seed the std is over clients; with several it is over seeds (of the
per-seed client mean). The best variant of every column is bold.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drdfl_flwr.experiments.grid import Partition
from drdfl_flwr.experiments.names import base_variant, is_isolated
from drdfl_flwr.experiments.outcomes import DONE, FAILED, STALE, RunOutcome
from drdfl_flwr.health import HEALTH_PREFIX
from drdfl_flwr.registry import method_spec, resolved_topology

LAYOUTS = {
    "dirichlet": "Dirichlet-based non-IID (the paper's Table 2 layout)",
    "shard": "Shard-based non-IID (Table 3 layout)",
    "iid": "IID",
}
METRICS = (("local_t_acc", "Local-T"), ("global_t_acc", "Global-T"))
# a hub method's fresh aggregate, scored apart (strategies.rounds.Router.scores_aggregate)
AGGREGATE_METRICS = (
    ("aggregate_local_t_acc", "Local-T of the aggregate"),
    ("aggregate_global_t_acc", "Global-T of the aggregate"),
)
LOCAL = "local"
VIEWS = {
    "last": "last round",
    "best": "best round (by mean Local-T; the round is given)",
}
SUMMARY_KEY = {"last": "last", "best": "best_by_local_t_acc"}
MISSING = "–"
VALUE = "value"


# -- numbers ------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    """The one number format of every table and CSV: fixed decimals, no locale and no
    float repr noise, so equal results always give equal bytes."""
    return f"{value:.{digits}f}"


def _count(value: float) -> str:
    """A parameter count as the paper's Table 1 writes it (``0.58 M``)."""
    for scale, unit in ((1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return fmt(value / scale) + unit
    return fmt(value, 0)


def _bytes(value: float) -> str:
    """Decimal units: a payload of 1.2 MB reads as such, not as 1,234,567."""
    for scale, unit in ((1e9, " GB"), (1e6, " MB"), (1e3, " kB")):
        if abs(value) >= scale:
            return fmt(value / scale) + unit
    return fmt(value, 0) + " B"


# -- cells --------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedResult:
    """One run's accuracies (percent) at the round a view picks."""

    round: int
    mean: dict[str, float]
    std: dict[str, float]


@dataclass(frozen=True)
class Cell:
    """One (variant, dataset, partition) over its seeds: a value, failed, or missing."""

    state: str  # VALUE | FAILED | MISSING
    seeds: int = 0  # runs the grid has for this cell
    done: int = 0  # of which have a result
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    rounds: tuple[int, ...] = ()


def seed_result(
    outcome: RunOutcome, view: str, metrics: Sequence[tuple[str, str]] = METRICS
) -> SeedResult | None:
    """``view`` (last | best) of one finished run. The best view is the summary's
    ``best_by_local_t_acc`` entry, which holds the Global-T of that same round: the
    paper selects by the personalization metric and reports both at that round."""
    if outcome.status != DONE or not outcome.summary:
        return None
    entry = outcome.summary.get(SUMMARY_KEY[view])
    if not entry:
        return None  # finished without a single evaluated round
    mean = {key: 100.0 * entry[key]["mean"] for key, _ in metrics if key in entry}
    std = {key: 100.0 * entry[key]["std"] for key, _ in metrics if key in entry}
    if not mean:
        return None
    return SeedResult(int(entry["round"]), mean, std)


def aggregate(
    outcomes: Sequence[RunOutcome], view: str, metrics: Sequence[tuple[str, str]] = METRICS
) -> Cell:
    """A cell from the runs of its seeds. A single result keeps its std over clients;
    several give the mean over seeds of the client mean, ± the population std over
    seeds (np.std), because seed-to-seed spread is what a reader compares methods by.
    Any failed seed fails the cell: a mean over the seeds that happened to work would
    hide the failure."""
    seeds = len(outcomes)
    if any(o.status == FAILED for o in outcomes):
        return Cell(FAILED, seeds)
    results = [r for o in outcomes if (r := seed_result(o, view, metrics)) is not None]
    if not results:
        return Cell(MISSING, seeds)
    rounds = tuple(r.round for r in results)
    if len(results) == 1:
        return Cell(VALUE, seeds, 1, results[0].mean, results[0].std, rounds)
    keys = [k for k, _ in metrics if all(k in r.mean for r in results)]
    mean = {k: float(np.mean([r.mean[k] for r in results])) for k in keys}
    std = {k: float(np.std([r.mean[k] for r in results])) for k in keys}
    return Cell(VALUE, seeds, len(results), mean, std, rounds)


# -- table structure ----------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column group: a dataset under one partition setting."""

    dataset: str
    partition: Partition

    @property
    def name(self) -> str:
        return f"{self.dataset} {self.partition.label}"


def _first_seen(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def variants(outcomes: Sequence[RunOutcome]) -> list[str]:
    """Rows, in the order the conf file lists the variants."""
    return _first_seen(o.run.variant for o in outcomes)


def kinds(outcomes: Sequence[RunOutcome]) -> list[str]:
    """Partition kinds present, in the paper's order (Table 2, Table 3, then IID)."""
    present = {o.run.partition.kind for o in outcomes}
    return [kind for kind in LAYOUTS if kind in present]


def columns(outcomes: Sequence[RunOutcome], kind: str) -> list[Column]:
    """Column groups of one partition kind, datasets and partitions in grid order."""
    chosen = [o.run for o in outcomes if o.run.partition.kind == kind]
    return _first_seen(Column(run.dataset, run.partition) for run in chosen)


def runs_in(outcomes: Sequence[RunOutcome], variant: str, column: Column) -> list[RunOutcome]:
    """The runs (one per seed) of one variant in one column."""
    return [
        o
        for o in outcomes
        if o.run.variant == variant and Column(o.run.dataset, o.run.partition) == column
    ]


def cells(outcomes: Sequence[RunOutcome], kind: str, view: str) -> dict[tuple[str, Column], Cell]:
    """Every (variant, column) of one partition kind; absent pairs are missing cells."""
    groups: dict[tuple[str, Column], list[RunOutcome]] = {}
    for o in outcomes:
        if o.run.partition.kind == kind:
            key = (o.run.variant, Column(o.run.dataset, o.run.partition))
            groups.setdefault(key, []).append(o)
    return {
        (variant, column): aggregate(groups.get((variant, column), []), view)
        for variant in variants(outcomes)
        for column in columns(outcomes, kind)
    }


def best_values(table: dict[tuple[str, Column], Cell]) -> dict[tuple[Column, str], float]:
    """The top value (as displayed, 2 decimals) of every (column, metric), for bold.
    Only where at least two variants have a number: a lone value is no win."""
    values: dict[tuple[Column, str], list[float]] = {}
    for (_, column), cell in table.items():
        for key, value in cell.mean.items():
            values.setdefault((column, key), []).append(round(value, 2))
    return {k: max(v) for k, v in values.items() if len(v) >= 2}


# -- markdown -----------------------------------------------------------------------


def _md_row(cells_: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells_) + " |"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    return lines + [_md_row(row) for row in rows]


def _rounds_text(rounds: Sequence[int]) -> str:
    return f"round {rounds[0]}" if len(rounds) == 1 else "rounds " + ", ".join(map(str, rounds))


def cell_text(cell: Cell, key: str, view: str, bold: bool) -> str:
    """A Markdown cell: ``92.86 ± 0.20``, bold for the column's best; the best view adds
    the round to Local-T, a partly done cell adds ``(k/N seeds)``."""
    if cell.state == FAILED:
        return "failed"
    if cell.state == MISSING or key not in cell.mean:
        return MISSING
    text = f"{fmt(cell.mean[key])} ± {fmt(cell.std[key])}"
    text = f"**{text}**" if bold else text
    if view == "best" and key == METRICS[0][0]:
        text += f" ({_rounds_text(cell.rounds)})"
    if cell.done < cell.seeds:
        text += f" ({cell.done}/{cell.seeds} seeds)"
    return text


def caption(table: dict[tuple[str, Column], Cell], view: str) -> str:
    """What the numbers are: the reader must never mistake a peak for a final value, or
    a spread over clients for one over seeds."""
    seeds = max((c.seeds for c in table.values()), default=1)
    where = (
        "at the last evaluated round"
        if view == "last"
        else "at the evaluated round with the highest mean Local-T (per seed), and Global-T "
        "at that same round"
    )
    if seeds <= 1:
        spread = "mean ± std over clients."
    else:
        spread = (
            f"mean over {seeds} seeds of the mean over clients ± std over the seeds "
            "(population std). A cell marked (k/N seeds) has only k seeds done (with k = 1 "
            "its std is over clients)."
        )
    legend = f"**Bold**: best variant per column. {MISSING}: no result yet."
    return f"Accuracy in %, {where}: {spread} {legend}"


def markdown_table(outcomes: Sequence[RunOutcome], kind: str, view: str) -> list[str]:
    """One accuracy table of one partition kind, with its heading and caption."""
    table = cells(outcomes, kind, view)
    cols = columns(outcomes, kind)
    best = best_values(table)
    header = ["method"] + [f"{c.name} {label}" for c in cols for _, label in METRICS]
    rows = []
    for variant in variants(outcomes):
        row = [variant]
        for column in cols:
            cell = table[(variant, column)]
            for key, _ in METRICS:
                top = best.get((column, key))
                bold = top is not None and key in cell.mean and round(cell.mean[key], 2) == top
                row.append(cell_text(cell, key, view, bold))
        rows.append(row)
    lines = [f"### {VIEWS[view]}", "", caption(table, view), ""]
    return lines + _md_table(header, rows) + [""]


# -- paired comparisons over seeds --------------------------------------------------

# two-sided 95 % Student t quantiles t_{0.975, df}, df = seeds - 1
T_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t_975(df: int) -> float:
    """The t quantile for ``df`` degrees of freedom (the next smaller tabulated df above
    10, which errs toward a wider interval)."""
    return T_975[max(d for d in T_975 if d <= df)]


@dataclass(frozen=True)
class Paired:
    """The per-seed difference ``a - b`` of client-mean accuracies (points) at the last
    round, over the seeds both have finished: mean and its 95 % interval."""

    seeds: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """Called only when the interval excludes 0."""
        if self.seeds < 2:
            return "not called (1 seed)"
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "not called"


def paired(a: Sequence[RunOutcome], b: Sequence[RunOutcome], key: str) -> Paired | None:
    """Seeds pair runs on the same partitions and the same common initial model; the
    interval is mean ± t_{0.975, n-1} s / sqrt(n) with s the sample std of the n
    differences."""
    by_seed = {}
    for o in b:
        if (r := seed_result(o, "last")) is not None and key in r.mean:
            by_seed[o.run.seed] = r.mean[key]
    diffs = [
        r.mean[key] - by_seed[o.run.seed]
        for o in a
        if (r := seed_result(o, "last")) is not None and key in r.mean and o.run.seed in by_seed
    ]
    if not diffs:
        return None
    mean = float(np.mean(diffs))
    if len(diffs) < 2:
        return Paired(1, mean, float("nan"), float("nan"))
    half = t_975(len(diffs) - 1) * float(np.std(diffs, ddof=1)) / np.sqrt(len(diffs))
    return Paired(len(diffs), mean, mean - half, mean + half)


def comparison_pairs(outcomes: Sequence[RunOutcome]) -> list[tuple[str, str, str]]:
    """(question, variant, reference) in grid order: every variant against ``local``,
    and every variant with a ``+isolated`` twin against that twin."""
    names = variants(outcomes)
    pairs = []
    for variant in names:
        twin = base_variant(variant)
        if is_isolated(variant) and twin in names:
            pairs.append(("sharing", twin, variant))
    for variant in names:
        if LOCAL in names and variant != LOCAL and not is_isolated(variant):
            pairs.append(("local", variant, LOCAL))
    return pairs


QUESTIONS = {
    "sharing": "Does sharing help? Each method minus its own isolated twin",
    "local": "Against Local: each method minus the Local baseline",
}


def _paired_text(result: Paired | None) -> list[str]:
    if result is None:
        return [MISSING, MISSING]
    if result.seeds < 2:
        return [f"{result.mean:+.2f}", result.verdict]
    return [f"{result.mean:+.2f} [{result.low:+.2f}, {result.high:+.2f}]", result.verdict]


def comparison_markdown(outcomes: Sequence[RunOutcome]) -> list[str]:
    """The questions a reader asks of a grid, answered per column with paired 95 %
    intervals over seeds; a difference is called only when its interval excludes 0."""
    pairs = comparison_pairs(outcomes)
    if not pairs:
        return []
    lines = [
        "## Paired differences over seeds (last round)",
        "",
        "Accuracy points, a minus b per seed (same partitions and common initial model), "
        "mean [95 % interval: mean ± t(0.975, n-1) s/sqrt(n)]. A difference is called "
        "higher or lower only when its interval excludes 0.",
        "",
    ]
    for question, title in QUESTIONS.items():
        chosen = [(a, b) for q, a, b in pairs if q == question]
        if not chosen:
            continue
        rows = []
        for kind in kinds(outcomes):
            for column in columns(outcomes, kind):
                for a, b in chosen:
                    runs_a, runs_b = runs_in(outcomes, a, column), runs_in(outcomes, b, column)
                    results = [paired(runs_a, runs_b, key) for key, _ in METRICS]
                    seeds = max((r.seeds for r in results if r is not None), default=0)
                    row = [a, b, column.name, str(seeds)]
                    for result in results:
                        row += _paired_text(result)
                    rows.append(row)
        header = ["a", "b", "data", "seeds"]
        for _, label in METRICS:
            header += [f"{label} a - b", f"{label} verdict"]
        lines += [f"### {title}", ""] + _md_table(header, rows) + [""]
    return lines


def aggregate_markdown(outcomes: Sequence[RunOutcome]) -> list[str]:
    """Hub methods' fresh aggregate, scored before any local training on it: a metric of
    its own, never in the main tables (which score every method after local training)."""
    rows = []
    for kind in kinds(outcomes):
        for column in columns(outcomes, kind):
            for variant in variants(outcomes):
                cell = aggregate(runs_in(outcomes, variant, column), "last", AGGREGATE_METRICS)
                if cell.state != VALUE:
                    continue
                row = [variant, column.name]
                row += [cell_text(cell, key, "last", False) for key, _ in AGGREGATE_METRICS]
                rows.append(row)
    if not rows:
        return []
    header = ["method", "data"] + [label for _, label in AGGREGATE_METRICS]
    return [
        "## Hub methods: the fresh aggregate (last round)",
        "",
        "The model the hub sends back, scored by each node before training on it (FedAvg's "
        "global model; FedRep's global body with the node's own head). Not comparable with "
        "the tables above, which score every method after its local round.",
        "",
        *_md_table(header, rows),
        "",
    ]


def error_line(outcome: RunOutcome) -> str:
    """The last line of a traceback is the one that says what went wrong."""
    lines = outcome.error.strip().splitlines()
    return lines[-1].strip() if lines else ""


def failed_section(outcomes: Sequence[RunOutcome]) -> list[str]:
    failed = [o for o in outcomes if o.status == FAILED]
    if not failed:
        return []
    lines = ["## Failed runs", ""]
    lines += [f"- `{o.run.run_id}`: {error_line(o) or '(no message)'}" for o in failed]
    return lines + [""]


def status_line(outcomes: Sequence[RunOutcome]) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in (DONE, STALE, FAILED)}
    pending = len(outcomes) - sum(counts.values())
    stale = (
        f", {counts[STALE]} stale (made under another results format: not in the tables)"
        if counts[STALE]
        else ""
    )
    return (
        f"{len(outcomes)} runs: {counts[DONE]} done{stale}, {counts[FAILED]} failed, "
        f"{pending} pending."
    )


# -- communication (Table 1) --------------------------------------------------------


COMMUNICATION_HEADER = (
    "variant",
    "dataset",
    "method",
    "runs on",
    "personalized part",
    "params sent/round/client",
    "bytes sent/round/client",
    "bytes received/round/client",
    "local passes/round/client",
    "optimizer steps/round/client",
)
COMMUNICATION_KEYS = (
    "mean_params_sent_per_client_per_round",
    "mean_bytes_sent_per_client_per_round",
    "mean_bytes_received_per_client_per_round",
)
# compute parity beside the traffic (drdfl_flwr.learner.measured_fit); runs made before
# it was measured have none
COMPUTE_KEYS = (
    "mean_local_passes_per_client_per_round",
    "mean_optimizer_steps_per_client_per_round",
)


def communication_rows(
    outcomes: Sequence[RunOutcome],
) -> list[tuple[list[str], list[float | None]]]:
    """One row per (variant, dataset), since payloads grow with the class count: the
    descriptive columns, and the per-round means (traffic, then compute; ``None`` where
    the run did not measure it) from the first finished run (empty while none finished)."""
    rows = []
    for variant, dataset in _first_seen((o.run.variant, o.run.dataset) for o in outcomes):
        group = [o for o in outcomes if (o.run.variant, o.run.dataset) == (variant, dataset)]
        cfg = group[0].run.cfg
        spec = method_spec(cfg.method)
        runs_on = f"{'hub' if spec.centralized else 'relay'} ({resolved_topology(cfg)})"
        described = [variant, dataset, cfg.method, runs_on, spec.personalized]
        done = next((o for o in group if o.status == DONE and o.summary), None)
        numbers: list[float | None] = []
        if done:
            numbers = [float(done.summary.get(k, 0.0)) for k in COMMUNICATION_KEYS]
            numbers += [float(done.summary[k]) if k in done.summary else None for k in COMPUTE_KEYS]
        rows.append((described, numbers))
    return rows


def communication_markdown(outcomes: Sequence[RunOutcome]) -> list[str]:
    rows = []
    for described, numbers in communication_rows(outcomes):
        if numbers:
            params, sent, received, passes, steps = numbers
            compute = [MISSING if v is None else fmt(v, 1) for v in (passes, steps)]
            rows.append(described + [_count(params), _bytes(sent), _bytes(received), *compute])
        else:
            rows.append(described + [MISSING] * 5)
    lines = [
        "## Communication (the paper's Table 1 layout)",
        "",
        "Per client and round, mean over clients and rounds, of the first finished run of "
        "each variant and dataset. Runs on: hub = a server averages (centralized), relay = "
        "the server only forwards peers' payloads (decentralized). Compute parity: local "
        "passes = local training examples drawn / training-set size (FedRep's head and "
        "body phases make two); optimizer steps counts every optimizer (DRDFL's "
        "adversarial head steps beside its main step).",
        "",
    ]
    return lines + _md_table(COMMUNICATION_HEADER, rows) + [""]


def tables_markdown(outcomes: Sequence[RunOutcome], title: str) -> str:
    lines = [f"# {title}", "", status_line(outcomes), ""]
    for kind in kinds(outcomes):
        lines += [f"## {LAYOUTS[kind]}", ""]
        for view in VIEWS:
            lines += markdown_table(outcomes, kind, view)
    lines += comparison_markdown(outcomes)
    lines += aggregate_markdown(outcomes)
    lines += communication_markdown(outcomes)
    lines += health_section(outcomes)
    lines += failed_section(outcomes)
    return "\n".join(lines).rstrip("\n") + "\n"


def health_section(outcomes: Sequence[RunOutcome]) -> list[str]:
    """Each finished run's mechanism health at its last round (mean over nodes), beside
    its ``+isolated`` twin where the grid has one: the numbers that show the shared part
    carrying information, a mask moving and staying bounded (:mod:`drdfl_flwr.health`)."""
    lines = []
    for outcome in outcomes:
        health = (outcome.summary or {}).get("last_health", {})
        shown = {k.removeprefix(HEALTH_PREFIX): v for k, v in health.items() if "." not in k}
        if outcome.status == DONE and shown:
            values = ", ".join(f"{k} {fmt(v, 4)}" for k, v in sorted(shown.items()))
            lines.append(f"- `{outcome.run.run_id}`: {values}")
    if not lines:
        return []
    return ["## Mechanism health at the last round (mean over nodes)", "", *lines, ""]


# -- CSV ----------------------------------------------------------------------------


def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """``\\n`` line ends on every platform, so files compare byte for byte."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _csv_value(cell: Cell, key: str, part: str) -> str:
    if cell.state == FAILED:
        return "failed"
    values = cell.mean if part == "mean" else cell.std
    return fmt(values[key], 4) if key in values else ""


def table_csv(outcomes: Sequence[RunOutcome], kind: str, view: str) -> str:
    """The Markdown table as numbers: ``<dataset> <partition> Local-T`` and a matching
    ``... Local-T std`` column per metric; the best view adds ``... round`` (rounds of
    several seeds joined by ``;``). Empty = missing."""
    table = cells(outcomes, kind, view)
    cols = columns(outcomes, kind)
    header = ["method"]
    for column in cols:
        for _, label in METRICS:
            header += [f"{column.name} {label}", f"{column.name} {label} std"]
        if view == "best":
            header.append(f"{column.name} round")
    rows: list[list[str]] = [header]
    for variant in variants(outcomes):
        row = [variant]
        for column in cols:
            cell = table[(variant, column)]
            for key, _ in METRICS:
                row += [_csv_value(cell, key, "mean"), _csv_value(cell, key, "std")]
            if view == "best":
                row.append(";".join(map(str, cell.rounds)))
        rows.append(row)
    return _csv_text(rows)


def communication_csv(outcomes: Sequence[RunOutcome]) -> str:
    rows: list[list[str]] = [list(COMMUNICATION_HEADER)]
    for described, numbers in communication_rows(outcomes):
        values = ["" if n is None else fmt(n, 1) for n in numbers]
        rows.append(described + (values if numbers else [""] * 5))
    return _csv_text(rows)


RUNS_HEADER = (
    "run_id",
    "variant",
    "method",
    "dataset",
    "partition",
    "seed",
    "status",
    "last_round",
    "last_local_t_mean",
    "last_local_t_std",
    "last_global_t_mean",
    "last_global_t_std",
    "best_round",
    "best_local_t_mean",
    "best_local_t_std",
    "best_global_t_mean",
    "best_global_t_std",
    "params_sent_per_round",
    "bytes_sent_per_round",
    "bytes_received_per_round",
    "error",
)


def _view_fields(outcome: RunOutcome, view: str) -> list[str]:
    result = seed_result(outcome, view)
    if result is None:
        return [""] * 5
    numbers = [
        fmt(values[key], 4) if key in values else ""
        for key, _ in METRICS
        for values in (result.mean, result.std)
    ]
    return [str(result.round)] + numbers


def run_row(outcome: RunOutcome) -> list[str]:
    """Everything a spreadsheet needs about one run (accuracies in %), no timing."""
    run, summary = outcome.run, outcome.summary or {}
    traffic = [fmt(float(summary[k]), 1) if k in summary else "" for k in COMMUNICATION_KEYS]
    return [
        run.run_id,
        run.variant,
        run.cfg.method,
        run.dataset,
        run.partition.key,
        str(run.seed),
        outcome.status,
        *_view_fields(outcome, "last"),
        *_view_fields(outcome, "best"),
        *traffic,
        error_line(outcome),
    ]


def runs_csv(outcomes: Sequence[RunOutcome]) -> str:
    return _csv_text([list(RUNS_HEADER)] + [run_row(o) for o in outcomes])


# -- timing (kept apart: it differs between identical runs) ------------------------


def timing_markdown(outcomes: Sequence[RunOutcome], title: str) -> str:
    """Per run: rounds, mean seconds per round and wall seconds. A run not finished
    shows what its ``metrics.jsonl`` holds so far."""
    rows, total = [], 0.0
    for o in outcomes:
        summary = o.summary or {}
        seconds = [float(r.get("seconds", 0.0)) for r in o.rounds]
        rounds = summary.get("rounds", len(o.rounds))
        per_round = summary.get("mean_seconds_per_round", np.mean(seconds) if seconds else None)
        wall = summary.get("wall_seconds")
        total += float(wall or 0.0)
        rows.append(
            [
                o.run.run_id,
                o.status,
                str(rounds),
                MISSING if per_round is None else fmt(float(per_round)),
                MISSING if wall is None else fmt(float(wall), 1),
            ]
        )
    header = ["run", "status", "rounds", "mean seconds/round", "wall seconds"]
    lines = [f"# {title}: timing", "", f"Wall seconds over finished runs: {fmt(total, 1)}.", ""]
    return "\n".join(lines + _md_table(header, rows)) + "\n"


# -- entry point --------------------------------------------------------------------


def write_report(
    outcomes: Sequence[RunOutcome], out_dir: Path, title: str, plots: bool = True
) -> list[Path]:
    """Write ``tables.md``, one CSV per (partition kind, last|best), ``communication.csv``,
    ``runs.csv`` and ``timing.md`` into ``out_dir``, and the figures of the same numbers:
    ``headline.png`` (the last-round table as bars, over seeds) and ``tradeoff.png``
    (every client's Local-T against its Global-T; one
    ``tradeoff_<dataset>_<partition>.png`` per column where there are several); returns
    the paths written (the figures only with ``plots``). ``outcomes`` come in grid order,
    which fixes the order of rows and columns."""
    from drdfl_flwr.experiments.plots import headline_plot, tradeoff_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"tables.md": tables_markdown(outcomes, title)}
    for kind in kinds(outcomes):
        for view in VIEWS:
            files[f"table_{kind}_{view}.csv"] = table_csv(outcomes, kind, view)
    files["communication.csv"] = communication_csv(outcomes)
    files["runs.csv"] = runs_csv(outcomes)
    files["timing.md"] = timing_markdown(outcomes, title)
    paths = []
    for name, text in files.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    if not plots:
        return paths
    return paths + headline_plot(outcomes, out_dir) + tradeoff_plots(outcomes, out_dir)
