"""What a node's local round costs, method beside method, in the setting a grid ran: the
seconds of one round's training (:func:`drdfl_flwr.node.node_round`, scoring left out),
the seconds per training step (a batch: the round's seconds outside DRDFL-VF's head
calibration over its batches), and the payload it then sends. For DRDFL-VF also the
seconds of that calibration (its full-batch steps on virtual features, once a round),
the part of its round that DRDFL has not. Issue 29 asks for DRDFL-VF's seconds per step
beside DRDFL's.

The configs are the grid's own runs (``--conf``, ``--variants``, the first seed), so the
node is the one that grid measured: in ``conf/cifar10-shards-vf.toml`` a CIFAR-10 client
with 500 images of 5 classes, 2 local epochs of batch 64, small CNN. Each method runs a
ring of ``--nodes`` nodes (each receiving its predecessor's last payload, so DRDFL-VF
aligns and calibrates on received moments as in the grid); the methods' rounds are
interleaved, so a slow moment of the machine falls on all of them alike. Medians over
the rounds after the first (which warms the caches).

    python benchmarks/round_cost.py --conf conf/cifar10-shards-vf.toml \
        --variants local,drdfl,drdfl-vf --rounds 5
    python benchmarks/round_cost.py --smoke       # digits, 2 rounds
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from drdfl_flwr.data import load_client_data
from drdfl_flwr.experiments.grid import GridRun, load_grid
from drdfl_flwr.node import node_round
from drdfl_flwr.payload import peers
from drdfl_flwr.registry import build_learner

ROOT = Path(__file__).resolve().parents[1]


def grid_runs(conf: Path, variants: list[str]) -> tuple[dict[str, GridRun], int]:
    """The grid's first-seed run of each variant, by variant (an unknown one is named),
    and the number of clients the grid splits the data over."""
    grid = load_grid(conf)
    runs: dict[str, GridRun] = {}
    for run in grid.runs:
        runs.setdefault(run.variant, run)
    missing = [v for v in variants if v not in runs]
    if missing:
        raise SystemExit(f"{conf} has no variant {', '.join(missing)}; it has {', '.join(runs)}")
    return {v: runs[v] for v in variants}, grid.options.clients


def timed_calibration(learner, sink: list[float]) -> None:
    """Wrap DRDFL-VF's ``calibrate`` on this one learner to add its seconds to ``sink``."""
    calibrate = learner.calibrate

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return calibrate(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - started)

    learner.calibrate = wrapper


def measure(
    runs: dict[str, GridRun], clients: int, nodes: int, rounds: int
) -> dict[str, dict[str, float]]:
    rings = {}
    for variant, run in runs.items():
        data = [load_client_data(run.cfg, p, clients) for p in range(nodes)]
        learners = [
            build_learner(run.cfg, data[0].input_shape, data[0].num_classes, p)
            for p in range(nodes)
        ]
        rings[variant] = (data, learners, [None] * nodes)
    spent: dict[int, list[float]] = {}  # learner -> its calibrations' seconds this round
    for _, learners, _ in rings.values():
        for learner in learners:
            spent[id(learner)] = []
            if hasattr(learner, "calibrate"):  # DRDFL-VF: wrapped once
                timed_calibration(learner, spent[id(learner)])
    data_of = {variant: ring[0][0] for variant, ring in rings.items()}
    seconds: dict[str, list[float]] = defaultdict(list)
    calibration: dict[str, list[float]] = defaultdict(list)
    payload: dict[str, float] = {}
    for r in range(1, rounds + 1):
        for variant, (data, learners, sent) in rings.items():
            for p, learner in enumerate(learners):
                spent[id(learner)].clear()
                incoming = peers(sent[p - 1]) if sent[p - 1] else []
                started = time.perf_counter()
                reply = node_round(learner, incoming, data[p], r, evaluate=False)
                elapsed = time.perf_counter() - started
                sent[p] = reply.payload
                if r > 1:
                    seconds[variant].append(elapsed)
                    calibration[variant].append(sum(spent[id(learner)]))
                payload[variant] = float(
                    sum(t.numel() * t.element_size() for t in reply.payload.values())
                )
        print(f"  round {r}/{rounds} done", file=sys.stderr, flush=True)
    return {
        variant: {
            "seconds": statistics.median(seconds[variant]),
            "batches": float(batches(runs[variant], len(data_of[variant].y_train))),
            "calibration": statistics.median(calibration[variant]),
            "payload": payload[variant],
        }
        for variant in runs
    }


def batches(run: GridRun, examples: int) -> int:
    """Training batches in one local round of ``examples`` (the last one may be short)."""
    return run.cfg.local_epochs * math.ceil(examples / run.cfg.batch_size)


def step_seconds(figures: dict[str, float]) -> float:
    """Seconds per training batch: the round's, less the calibration, over its batches."""
    return (figures["seconds"] - figures["calibration"]) / figures["batches"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", type=Path, default=ROOT / "conf" / "cifar10-shards-vf.toml")
    parser.add_argument("--variants", default="local,drdfl,drdfl-vf")
    parser.add_argument("--nodes", type=int, default=2, help="ring size per method (>= 2)")
    parser.add_argument("--rounds", type=int, default=5, help="the first is not counted")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the grid: 1)")
    parser.add_argument("--smoke", action="store_true", help="cpu-smoke's digits, 2 rounds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.conf, args.rounds = ROOT / "conf" / "cpu-smoke.toml", 2
    if args.nodes < 2 or args.rounds < 2:
        parser.error(f"--nodes and --rounds must be >= 2, got {args.nodes} and {args.rounds}")
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    runs, clients = grid_runs(args.conf, variants)
    figures = measure(runs, clients, args.nodes, args.rounds)
    reference = figures.get("drdfl")
    print(
        f"{args.conf.name}, {args.nodes} nodes per method, {args.rounds - 1} rounds counted, "
        f"{args.threads} thread(s), torch {torch.__version__}; medians per node round"
    )
    print(
        "| method | s/round | of which calibration | batches | s/step | payload bytes "
        "| s/step vs DRDFL | payload vs DRDFL |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, f in figures.items():
        per_step = (f["seconds"] - f["calibration"]) / f["batches"]
        ratios = ["", ""]
        if reference:
            reference_step = (reference["seconds"] - reference["calibration"]) / reference[
                "batches"
            ]
            ratios = [
                f"{per_step / reference_step:.2f}x",
                f"{f['payload'] / reference['payload']:.2f}x" if reference["payload"] else "",
            ]
        print(
            f"| {variant} | {f['seconds']:.2f} | {f['calibration']:.2f} | {f['batches']:.0f} | "
            f"{per_step:.3f} | {f['payload']:,.0f} | {ratios[0]} | {ratios[1]} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
