"""A grid's tables, in the paper's layouts, as Markdown and CSV.

Everything here is a pure function of the runs' outcomes (:mod:`.outcomes`), so a
report can be rebuilt at any time, from a finished or a half-finished grid. The tables
and CSV files hold no timing, no timestamps and no absolute paths: two grids that ran
the same seeds to the same results write byte-identical files, which makes a report
something to diff. Timing goes to its own ``timing.md``.

Layout (the paper's Tables 2 and 3): one row per variant, one column group per
(dataset, partition setting), each with the scores of :mod:`drdfl_flwr.scoring` (the
expected Local-T and the paper's sampled Local-T, balanced and pooled Global-T, the
accuracy on absent classes), cells ``mean ± std`` in percent, and a first row with the
majority-class predictor's scores (the floor). With one seed the std is over clients; with
several it is the sample std over seeds (of the per-seed client mean). The best variant
of every column is bold.

Comparisons (:mod:`.stats`): the grid's declared primary comparisons, Bonferroni-corrected
with p-values, then every other difference, labelled exploratory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drdfl_flwr.experiments.grid import Partition, PrimaryComparison
from drdfl_flwr.experiments.names import base_variant, is_isolated
from drdfl_flwr.experiments.outcomes import DONE, FAILED, STALE, RunOutcome
from drdfl_flwr.experiments.stats import ALPHA, PairedTest, paired_test, sample_std
from drdfl_flwr.health import HEALTH_PREFIX
from drdfl_flwr.registry import method_spec, resolved_topology
from drdfl_flwr.scoring import (
    ABSENT_CLASS,
    EXPECTED_LOCAL_T,
    FLOOR_PREFIX,
    GLOBAL_T,
    GLOBAL_T_BALANCED,
    LOCAL_T,
)

LAYOUTS = {
    "dirichlet": "Dirichlet-based non-IID (the paper's Table 2 layout)",
    "dirichlet-client": "Dirichlet-based non-IID, class mix drawn per client",
    "shard": "Shard-based non-IID (Table 3 layout)",
    "iid": "IID",
}
METRICS = (
    (EXPECTED_LOCAL_T, "expected Local-T"),
    (LOCAL_T, "Local-T"),
    (GLOBAL_T_BALANCED, "balanced Global-T"),
    (GLOBAL_T, "Global-T"),
    (ABSENT_CLASS, "absent-class"),
)
FLOOR = "majority-class floor"  # the row of the majority-class predictor's scores
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
    outcome: RunOutcome,
    view: str,
    metrics: Sequence[tuple[str, str]] = METRICS,
    prefix: str = "",
) -> SeedResult | None:
    """``view`` (last | best) of one finished run. The best view is the summary's
    ``best_by_local_t_acc`` entry, which holds the Global-T of that same round: the
    paper selects by the personalization metric and reports both at that round.
    ``prefix``: read ``<prefix><key>`` (the floor's ``floor_``), keyed by ``key``."""
    if outcome.status != DONE or not outcome.summary:
        return None
    entry = outcome.summary.get(SUMMARY_KEY[view])
    if not entry:
        return None  # finished without a single evaluated round
    mean = {key: 100.0 * entry[prefix + key]["mean"] for key, _ in metrics if prefix + key in entry}
    std = {key: 100.0 * entry[prefix + key]["std"] for key, _ in metrics if prefix + key in entry}
    if not mean:
        return None
    return SeedResult(int(entry["round"]), mean, std)


def aggregate(
    outcomes: Sequence[RunOutcome],
    view: str,
    metrics: Sequence[tuple[str, str]] = METRICS,
    prefix: str = "",
) -> Cell:
    """A cell from the runs of its seeds. A single result keeps its std over clients;
    several give the mean over seeds of the client mean, ± the sample std over seeds
    (n - 1), because seed-to-seed spread is what a reader compares methods by. Any
    failed seed fails the cell: a mean over the seeds that happened to work would hide
    the failure."""
    seeds = len(outcomes)
    if any(o.status == FAILED for o in outcomes):
        return Cell(FAILED, seeds)
    results = [r for o in outcomes if (r := seed_result(o, view, metrics, prefix)) is not None]
    if not results:
        return Cell(MISSING, seeds)
    rounds = tuple(r.round for r in results)
    if len(results) == 1:
        return Cell(VALUE, seeds, 1, results[0].mean, results[0].std, rounds)
    keys = [k for k, _ in metrics if all(k in r.mean for r in results)]
    mean = {k: float(np.mean([r.mean[k] for r in results])) for k in keys}
    std = {k: sample_std([r.mean[k] for r in results]) for k in keys}
    return Cell(VALUE, seeds, len(results), mean, std, rounds)


def present_metrics(
    outcomes: Sequence[RunOutcome], metrics: Sequence[tuple[str, str]] = METRICS
) -> list[tuple[str, str]]:
    """The metrics some finished run reports (a run of a dataset whose clients hold
    every class has no absent-class accuracy), in table order."""
    seen = set()
    for o in outcomes:
        entry = (o.summary or {}).get("last", {}) if o.status == DONE else {}
        seen.update(entry)
    return [(key, label) for key, label in metrics if key in seen]


def floor_cell(outcomes: Sequence[RunOutcome], column: Column, view: str) -> Cell:
    """The majority-class predictor's scores in ``column``, one per seed (every run of a
    seed has the same partitions, so the first finished run of each seed gives them)."""
    chosen: dict[int, RunOutcome] = {}
    for o in outcomes:
        if Column(o.run.dataset, o.run.partition) != column or o.status != DONE:
            continue
        entry = (o.summary or {}).get(SUMMARY_KEY[view], {})
        if any(FLOOR_PREFIX + key in entry for key, _ in METRICS):
            chosen.setdefault(o.run.seed, o)
    return aggregate(list(chosen.values()), view, METRICS, prefix=FLOOR_PREFIX)


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
    spread = cell.std[key]
    text = f"{fmt(cell.mean[key])} ± {fmt(spread)}" if spread == spread else fmt(cell.mean[key])
    text = f"**{text}**" if bold else text
    if view == "best" and key == LOCAL_T:
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
        else "at the evaluated round with the highest mean Local-T (per seed), and the other "
        "scores at that same round"
    )
    if seeds <= 1:
        spread = "mean ± std over clients."
    else:
        spread = (
            f"mean over {seeds} seeds of the mean over clients ± the sample std over the seeds "
            "(n - 1). A cell marked (k/N seeds) has only k seeds done (with k = 1 its std is "
            "over clients)."
        )
    scores = (
        "Expected Local-T: sum over classes of the client's training proportion times its "
        "accuracy on that class's whole test set; Local-T: the paper's, on the client's own "
        "sampled test split; balanced Global-T: the mean per-class accuracy on the whole test "
        "set; absent-class: the mean accuracy on the classes the client holds no training "
        f"image of. {FLOOR}: a predictor that always answers the client's majority training "
        "class."
    )
    legend = f"**Bold**: best variant per column. {MISSING}: no result yet."
    return f"Accuracy in %, {where}: {spread} {scores} {legend}"


def markdown_table(outcomes: Sequence[RunOutcome], kind: str, view: str) -> list[str]:
    """One accuracy table of one partition kind, with its heading and caption; the
    majority-class floor first."""
    table = cells(outcomes, kind, view)
    cols = columns(outcomes, kind)
    metrics = present_metrics(outcomes)
    best = best_values(table)
    header = ["method"] + [f"{c.name} {label}" for c in cols for _, label in metrics]
    floor = [FLOOR]
    for column in cols:
        cell = floor_cell(outcomes, column, view)
        floor += [cell_text(cell, key, "last", False) for key, _ in metrics]
    rows = [floor] if any(text != MISSING for text in floor[1:]) else []
    for variant in variants(outcomes):
        row = [variant]
        for column in cols:
            cell = table[(variant, column)]
            for key, _ in metrics:
                top = best.get((column, key))
                bold = top is not None and key in cell.mean and round(cell.mean[key], 2) == top
                row.append(cell_text(cell, key, view, bold))
        rows.append(row)
    lines = [f"### {VIEWS[view]}", "", caption(table, view), ""]
    return lines + _md_table(header, rows) + [""]


# -- paired comparisons over seeds --------------------------------------------------


def seed_values(outcomes: Sequence[RunOutcome], key: str) -> dict[int, float]:
    """The last round's client mean of ``key`` (points), by seed, of the finished runs."""
    return {
        o.run.seed: r.mean[key]
        for o in outcomes
        if (r := seed_result(o, "last")) is not None and key in r.mean
    }


def paired(
    a: Sequence[RunOutcome], b: Sequence[RunOutcome], key: str, family_size: int = 1
) -> PairedTest | None:
    """``a - b`` over the seeds both have finished (a seed pairs runs on the same
    partitions and the same common initial model): the paired t-test of :mod:`.stats`,
    Bonferroni-corrected for ``family_size`` tests."""
    values_a, values_b = seed_values(a, key), seed_values(b, key)
    seeds = sorted(set(values_a) & set(values_b))
    if not seeds:
        return None
    return paired_test([values_a[s] for s in seeds], [values_b[s] for s in seeds], family_size)


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


def _p_text(p: float) -> str:
    if p != p:
        return MISSING
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _paired_text(result: PairedTest | None) -> list[str]:
    """``mean [low, high]``, the p-value and the verdict."""
    if result is None:
        return [MISSING, MISSING, MISSING]
    if result.seeds < 2:
        return [f"{result.mean:+.2f}", MISSING, result.verdict]
    interval = f"{result.mean:+.2f} [{result.low:+.2f}, {result.high:+.2f}]"
    return [interval, _p_text(result.p_adjusted), result.verdict]


def primary_markdown(
    outcomes: Sequence[RunOutcome], primary: Sequence[PrimaryComparison]
) -> list[str]:
    """The comparisons the grid declared before its runs, one family over every column:
    Bonferroni-corrected intervals and p-values; a difference is called only when its
    corrected interval excludes 0."""
    if not primary:
        return []
    cols = [c for kind in kinds(outcomes) for c in columns(outcomes, kind)]
    family = len(primary) * len(cols)
    labels = dict(METRICS)
    rows = []
    for column in cols:
        for comparison in primary:
            runs_a = runs_in(outcomes, comparison.a, column)
            runs_b = runs_in(outcomes, comparison.b, column)
            result = paired(runs_a, runs_b, comparison.metric, family)
            raw = MISSING if result is None else _p_text(result.p)
            seeds = MISSING if result is None else str(result.seeds)
            row = [comparison.a, comparison.b, labels[comparison.metric], column.name, seeds]
            rows.append(row + [raw, *_paired_text(result)])
    level = 100 * (1 - ALPHA / family)
    header = ["a", "b", "metric", "data", "seeds", "p", "a - b", "p (Bonferroni)", "verdict"]
    return [
        "## Primary comparisons (declared in the grid file before the runs)",
        "",
        f"Accuracy points, a minus b per seed, paired t-test over seeds (scipy). One family "
        f"of {family} tests, Bonferroni-corrected: the interval is the {level:.2f} % "
        f"t-interval (1 - {ALPHA}/{family}) and p (Bonferroni) = min(1, {family} p). A "
        "difference is called higher or lower only when its corrected interval excludes 0.",
        "",
        *_md_table(header, rows),
        "",
    ]


def comparison_markdown(outcomes: Sequence[RunOutcome]) -> list[str]:
    """Every other question a reader asks of a grid, per column, with uncorrected 95 %
    intervals and p-values: exploratory, and labelled so."""
    pairs = comparison_pairs(outcomes)
    if not pairs:
        return []
    metrics = present_metrics(outcomes)
    lines = [
        "## Exploratory paired differences over seeds (last round)",
        "",
        "Accuracy points, a minus b per seed (same partitions and common initial model), "
        "mean [95 % t-interval], two-sided p of the paired t-test, **uncorrected for "
        "multiplicity**: with this many intervals some exclude 0 by chance. Exploratory: a "
        "lead for the next grid's primary comparisons, not a finding.",
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
                    results = [paired(runs_a, runs_b, key) for key, _ in metrics]
                    seeds = max((r.seeds for r in results if r is not None), default=0)
                    row = [a, b, column.name, str(seeds)]
                    for result in results:
                        row += _paired_text(result)
                    rows.append(row)
        header = ["a", "b", "data", "seeds"]
        for _, label in metrics:
            header += [f"{label} a - b", f"{label} p", f"{label} verdict"]
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


def tables_markdown(
    outcomes: Sequence[RunOutcome],
    title: str,
    primary: Sequence[PrimaryComparison] = (),
) -> str:
    lines = [f"# {title}", "", status_line(outcomes), ""]
    for kind in kinds(outcomes):
        lines += [f"## {LAYOUTS[kind]}", ""]
        for view in VIEWS:
            lines += markdown_table(outcomes, kind, view)
    lines += primary_markdown(outcomes, primary)
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
    ``... Local-T std`` column per metric, the floor as the first row; the best view adds
    ``... round`` (rounds of several seeds joined by ``;``). Empty = missing."""
    table = cells(outcomes, kind, view)
    cols = columns(outcomes, kind)
    metrics = present_metrics(outcomes)
    header = ["method"]
    for column in cols:
        for _, label in metrics:
            header += [f"{column.name} {label}", f"{column.name} {label} std"]
        if view == "best":
            header.append(f"{column.name} round")
    rows: list[list[str]] = [header]
    named = [(FLOOR, {c: floor_cell(outcomes, c, view) for c in cols})]
    named += [(v, {c: table[(v, c)] for c in cols}) for v in variants(outcomes)]
    for name, by_column in named:
        row = [name]
        for column in cols:
            cell = by_column[column]
            for key, _ in metrics:
                row += [_csv_value(cell, key, "mean"), _csv_value(cell, key, "std")]
            if view == "best":
                row.append(";".join(map(str, cell.rounds)) if name != FLOOR else "")
        if name != FLOOR or any(row[1:]):
            rows.append(row)
    return _csv_text(rows)


def communication_csv(outcomes: Sequence[RunOutcome]) -> str:
    rows: list[list[str]] = [list(COMMUNICATION_HEADER)]
    for described, numbers in communication_rows(outcomes):
        values = ["" if n is None else fmt(n, 1) for n in numbers]
        rows.append(described + (values if numbers else [""] * 5))
    return _csv_text(rows)


def _short(key: str) -> str:
    return key.removesuffix("_acc")


def _view_header(view: str) -> list[str]:
    return [f"{view}_round"] + [
        f"{view}_{_short(key)}_{part}" for key, _ in METRICS for part in ("mean", "std")
    ]


RUNS_HEADER = (
    "run_id",
    "variant",
    "method",
    "dataset",
    "partition",
    "seed",
    "status",
    *_view_header("last"),
    *_view_header("best"),
    *(f"floor_{_short(key)}_mean" for key, _ in METRICS),
    "params_sent_per_round",
    "bytes_sent_per_round",
    "bytes_received_per_round",
    "error",
)


def _view_fields(outcome: RunOutcome, view: str, prefix: str = "") -> list[str]:
    result = seed_result(outcome, view, prefix=prefix)
    if result is None:
        return [""] * (2 * len(METRICS) + 1)
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
        *_view_fields(outcome, "last", FLOOR_PREFIX)[1::2],  # the means, not the std
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
    outcomes: Sequence[RunOutcome],
    out_dir: Path,
    title: str,
    primary: Sequence[PrimaryComparison] = (),
) -> list[Path]:
    """Write ``tables.md``, one CSV per (partition kind, last|best), ``communication.csv``,
    ``runs.csv`` and ``timing.md`` into ``out_dir``; returns the paths written (the
    figures of the same numbers are :func:`drdfl_flwr.experiments.plots.report_figures`).
    ``outcomes`` come in grid order, which fixes the order of rows and columns."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"tables.md": tables_markdown(outcomes, title, primary)}
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
    return paths
