"""``python -m drdfl_flwr.experiments conf/<name>.toml``: run a grid, resumably, and write
its tables and plots (see docs/reproducing.md)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

from drdfl_flwr.config import ConfigError, flatten_tables
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.outcomes import DONE, FAILED, PENDING, STALE, read_outcome
from drdfl_flwr.experiments.runner import run_grid, write_all
from drdfl_flwr.provenance import RESULTS_FORMAT

# One key=value pair of ``flwr run --run-config "k1=v1 k2=v2"``: the value quoted ('...' or
# "...", spaces allowed) or up to the next space (flwr.common.config.parse_config_args).
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drdfl_flwr.experiments",
        description="Run the grid of a conf file (variants x datasets x partitions x seeds) "
        "and write the paper-layout tables, communication table and plots.",
    )
    parser.add_argument("conf", help="a conf/*.toml file with a [grid] table")
    parser.add_argument("--out", help="results folder (default: results/<conf name>)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override for every run, as flwr run --run-config takes them: "
        "space-separated key=value pairs, values in TOML syntax, a bare word a string, "
        "e.g. --set 'num-server-rounds=2 method=fedavg grid.variants=\"local, drdfl\"' "
        "(repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the runs and their state")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite tables and plots from disk (refused where the existing tables.md "
        "reports more finished runs than the folder now holds for this conf file)",
    )
    parser.add_argument(
        "--no-plots",
        action="store_true",
        help="write the tables and CSVs only, not the figures (a report in seconds: drawing "
        "the label distributions reads the dataset)",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --report-only: overwrite regardless"
    )
    parser.add_argument(
        "--keep-failed", action="store_true", help="do not retry runs that failed before"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every node's ClientApp in this process, one message after another, "
        "instead of in Flower's Ray engine (drdfl_flwr.inprocess: the same round loop "
        "and results; for small grids and checks)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        grid = load_grid(args.conf, parse_overrides(args.set))
    except (ConfigError, SetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("results") / grid.name)
    if args.list:
        statuses = [read_outcome(run, out / "runs").status for run in grid.runs]
        for run, status in zip(grid.runs, statuses, strict=True):
            print(f"{status:8} {run.run_id}")
        shown = (DONE, STALE, FAILED, PENDING) if STALE in statuses else (DONE, FAILED, PENDING)
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in shown)
        print(f"{len(statuses)} runs: {counts}")
        if STALE in statuses:
            print(
                f"stale: finished under another results format than today's "
                f"({RESULTS_FORMAT}, drdfl_flwr/provenance.py); the grid runs them again"
            )
        return 0
    if args.report_only:
        outcomes = [read_outcome(run, out / "runs") for run in grid.runs]
        done, reported = sum(o.status == DONE for o in outcomes), reported_done(out)
        if reported is not None and done < reported and not args.force:
            print(
                f"error: {out / 'tables.md'} reports {reported} finished runs, but only "
                f"{done} of the {len(outcomes)} runs in {out} match {args.conf} and its "
                "data (see --list); not overwritten (--force to overwrite)",
                file=sys.stderr,
            )
            return 1
        write_all(grid, outcomes, out, plots=not args.no_plots)
        return 0
    simulate_fn = None
    if args.in_process:
        from drdfl_flwr.inprocess import simulate_in_process as simulate_fn
    else:
        from drdfl_flwr.simulation import NoGpuError, check_gpus, ray_address_for

        try:  # once for the grid, not once per run: every run would fail the same way
            check_gpus(grid.options.gpus_per_client, ray_address_for(None))
        except NoGpuError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    outcomes = run_grid(
        grid,
        out,
        retry_failed=not args.keep_failed,
        plots=not args.no_plots,
        simulate_fn=simulate_fn,
    )
    return 1 if any(o.status == FAILED for o in outcomes) else 0


class SetError(ValueError):
    """A ``--set`` argument that is not ``key=value`` pairs."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set`` arguments as ``flwr run --run-config`` parses them (each argument holds
    space-separated ``key=value`` pairs, a value in TOML syntax), but a bare word is a
    string (``method=drdfl``), and text that is no pair or no value is refused, naming
    it, rather than dropped."""
    values: dict[str, Any] = {}
    for item in items:
        pairs = list(PAIR.finditer(item))
        ends = [m.start() for m in pairs[1:]] + [len(item)]
        if not pairs:
            raise SetError(
                f"--set {shlex.quote(item)}: not key=value (no spaces around =; pairs are "
                "separated by spaces)"
            )
        if lead := item[: pairs[0].start()].strip():
            raise SetError(f"--set {shlex.quote(item)}: {lead!r} is not a key=value pair")
        for match, until in zip(pairs, ends, strict=True):
            key, raw = match.groups()
            stray = item[match.end() : until].strip()
            if stray:  # "grid.seeds=1, 2": the value went on after a space
                quoted = f'{key}="{item[match.start(2) : until].strip()}"'
                raise SetError(
                    f"--set {shlex.quote(item)}: {stray!r} is not a key=value pair; a value "
                    f"with spaces is quoted: --set {shlex.quote(quoted)}"
                )
            values.update(_pair(key, raw))
    return values


def _pair(key: str, raw: str) -> dict[str, Any]:
    """One ``key=value``: TOML, else a bare word as a string."""
    pair = shlex.quote(f"{key}={raw}")
    try:
        return flatten_tables(tomllib.loads(f"{key} = {raw}"))
    except tomllib.TOMLDecodeError as err:
        try:
            tomllib.loads(f'{key} = ""')
        except tomllib.TOMLDecodeError:
            raise SetError(f"--set {pair}: {key!r} is not a run-config key name") from None
        if not raw.startswith(("'", '"', "[", "{")):  # a bare word
            return {key: raw}
        reason = re.sub(r" \(at [^()]*\)$", "", str(err))
        quoted = f'{key}="{raw.strip(QUOTES)}"'
        raise SetError(
            f"--set {pair}: {raw} is not a TOML value ({reason}); a string is quoted as in "
            f"TOML, and the whole pair in single quotes for the shell: --set {shlex.quote(quoted)}"
        ) from None


QUOTES = "\"'"


def reported_done(out: Path) -> int | None:
    """The finished runs an existing ``tables.md`` reports (its "N runs: D done, ..."
    line), or None where there is none."""
    path = out / "tables.md"
    if not path.is_file():
        return None
    match = re.search(r"^\d+ runs: (\d+) done\b", path.read_text(), re.MULTILINE)
    return int(match[1]) if match else None


def cli() -> int:
    """``main`` as a command: output into a closed pipe (``--list | head``) ends it
    quietly, as it ends any Unix tool (Python's documented handling of SIGPIPE)."""
    try:
        code = main()
        sys.stdout.flush()  # inside the try: a closed pipe fails here, not at exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 1


if __name__ == "__main__":
    sys.exit(cli())
