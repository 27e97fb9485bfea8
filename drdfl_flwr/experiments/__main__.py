"""``python -m drdfl_flwr.experiments conf/<name>.toml``: run a grid, resumably, and write
its tables and plots (see README, "Reproduce the paper's tables")."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from pathlib import Path

from drdfl_flwr.config import ConfigError, flatten_tables
from drdfl_flwr.experiments.grid import load_grid
from drdfl_flwr.experiments.outcomes import DONE, FAILED, read_outcome
from drdfl_flwr.experiments.runner import run_grid, write_all


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
        help="run-config override for every run, TOML value syntax, e.g. "
        "num-server-rounds=2 or grid.seeds='\"1,2\"' (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the runs and their state")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite tables and plots from disk (refused where the existing tables.md "
        "reports more finished runs than the folder now holds for this conf file)",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --report-only: overwrite regardless"
    )
    parser.add_argument(
        "--keep-failed", action="store_true", help="do not retry runs that failed before"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        overrides = flatten_tables(tomllib.loads("\n".join(args.set)))
        grid = load_grid(args.conf, overrides)
    except (ConfigError, tomllib.TOMLDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("results") / grid.name)
    if args.list:
        for run in grid.runs:
            print(f"{read_outcome(run, out / 'runs').status:8} {run.run_id}")
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
        write_all(grid, outcomes, out)
        return 0
    outcomes = run_grid(grid, out, retry_failed=not args.keep_failed)
    return 1 if any(o.status == FAILED for o in outcomes) else 0


def reported_done(out: Path) -> int | None:
    """The finished runs an existing ``tables.md`` reports (its "N runs: D done, ..."
    line), or None where there is none."""
    path = out / "tables.md"
    if not path.is_file():
        return None
    match = re.search(r"^\d+ runs: (\d+) done\b", path.read_text(), re.MULTILINE)
    return int(match[1]) if match else None


if __name__ == "__main__":
    sys.exit(main())
