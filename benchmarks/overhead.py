"""What the simulation adds to the training, and how it grows with the clients: seconds per
round and peak memory, side by side.

For each method and number of clients, in one process, one after the other:

1. the simulation (Flower's Ray engine through ``drdfl_flwr.simulation.simulate``, one
   CPU per client actor): steady-state seconds per round = the mean over rounds 2.. (the
   first round pays Ray start-up, node discovery and data decoding), and the peak
   proportional set size (PSS) summed over every process of the job (this driver, Ray's
   GCS and raylet, every worker), sampled every 5 seconds (a sample reads every
   process's ``smaps_rollup``, which makes the kernel walk its page tables: 0.17 s of a
   core per sample with 100 clients' actors at 2-3 GiB each; sampled every second, that
   was 8 % of these 2 cores taken from the job it measures);
2. the same work as a plain single-process PyTorch loop
   (:func:`drdfl_flwr.inprocess.run_ring`, checked to score what the apps score): the
   same learners, data, seeds, ring payloads or hub aggregates, training and evaluation,
   one thread, nodes one after another, state kept in memory. Its steady seconds per
   round are the serial cost; divided by the cores the simulation used, the parallel
   floor (perfect scaling, zero overhead). Beside it, the floor plus the idle that the
   round's barriers force on any engine (:func:`barrier_idle`, from the plain loop's
   per-node seconds): no schedule beats the longest node of a phase.

The ratio simulation / floor is the framework's overhead (1.00 = none). The total data
is the same at every size (``--subset-train`` split over the clients), so a larger
federation does the same training; what grows with the clients is the framework's
per-node work and the evaluation (each client scores the whole Global-T set). Memory per
client is the slope of the simulation's peak over the sizes (least squares). Where the
simulation's time goes is shown from the per-message timings the ClientApp reports
(``time_*`` metrics: restoring state, absorbing, training, saving, evaluating).

    python benchmarks/overhead.py --data-dir ../shared/datasets/cifar10 \\
        --methods drdfl,fedavg,dslth --clients 10,20,50,100 --subset-train 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from drdfl_flwr.config import RunConfig
from drdfl_flwr.inprocess import run_ring
from drdfl_flwr.simulation import simulate
from strategies.rounds import AGGREGATE_PREFIX

# Each method as the comparison runs it: DSLTH trains local-epochs epochs of its steps
# (its released procedure is one step per round, which would time the framework alone).
METHOD_KEYS = {"dslth": {"dslth.procedure": "epochs"}}


class PeakMemory:
    """Peak total PSS (MiB) of this process and all its descendants, sampled in a thread.
    PSS splits shared pages among the processes sharing them, so the sum is the job's
    real footprint (RSS would count torch's shared libraries once per worker)."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            by_process = tree_pss_mib(os.getpid())
            total = sum(by_process.values())
            if total > self.peak_mib:
                self.peak_mib, self.peak_by_process = total, by_process
            self._stop.wait(self.interval)

    peak_by_process: dict[str, float] = {}

    def breakdown(self) -> str:
        """The processes at the peak, largest first (name: MiB)."""
        merged: dict[str, list[float]] = {}
        for name, mib in self.peak_by_process.items():
            merged.setdefault(name.split("#")[0], []).append(mib)
        parts = sorted(merged.items(), key=lambda kv: -sum(kv[1]))
        return ", ".join(
            f"{name} {len(v)}x{sum(v) / len(v):.0f}" if len(v) > 1 else f"{name} {v[0]:.0f}"
            for name, v in parts
        )


def tree_pss_mib(root: int) -> dict[str, float]:
    """PSS in MiB of ``root`` and its descendants, by ``<process name>#<pid>``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[str, float] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    found[f"{Path(name).name or '?'}#{pid}"] = int(line.split()[1]) / 1024
                    break
        except OSError:
            continue
    return found


def simulated_rounds(cfg: RunConfig, clients: int) -> tuple[list[float], dict, float]:
    """Per-round seconds, mean per-message timings (rounds 2..) and the peak PSS."""
    with PeakMemory() as memory:
        simulate(cfg, clients, cpus_per_client=1.0)
    metrics = Path(cfg.results_dir) / cfg.run_name / "metrics.jsonl"
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    steady = rounds[1:] or rounds
    timings = {
        key: float(np.mean([r["mean"][key] for r in steady if key in r["mean"]]))
        for key in steady[0]["mean"]
        if key.startswith("time_") or key == "warm_start"
    }
    print(f"  simulation peak by process (MiB): {memory.breakdown()}", flush=True)
    return [r["seconds"] for r in rounds], timings, memory.peak_mib


def plain_rounds(
    cfg: RunConfig, clients: int, cores: int
) -> tuple[list[float], float, list[float]]:
    """The same rounds in a plain loop, one thread: per-round seconds, the peak PSS, and
    per round the idle that the round's barriers force on ``cores`` workers whatever
    the engine (:func:`barrier_idle`)."""
    torch.set_num_threads(1)
    marks: list[float] = []
    with PeakMemory() as memory:
        ring = run_ring(
            cfg,
            clients,
            cfg.num_server_rounds,
            on_round=lambda _: marks.append(time.perf_counter()),
        )
    idle = [barrier_idle(record["nodes"], cores) for record in ring.history[1:]]
    return list(np.diff(marks)), memory.peak_mib, idle


def barrier_idle(nodes: list[dict[str, float] | None], cores: int) -> float:
    """Seconds a synchronous round must add to (its work / ``cores``) on any engine: in
    each phase that ends in a barrier (training; on the hub also scoring the aggregate)
    no schedule finishes before the longest node does, so a node longer than the phase's
    work per core leaves the others idle: max(0, longest - work / cores) per phase. With
    Dirichlet 0.1, a few nodes hold most of the data, and at 10 clients this is large."""
    there = [n for n in nodes if n is not None]
    phases = [
        [sum(v for k, v in n.items() if k.startswith("time_")) for n in there],
        [n.get(AGGREGATE_PREFIX + "time_evaluate", 0.0) for n in there],
    ]
    return sum(max(0.0, max(t) - sum(t) / cores) for t in phases if t and max(t) > 0)


def per_client_mib(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of peak MiB over clients (nan with fewer than two sizes)."""
    if len({c for c, _ in points}) < 2:
        return float("nan")
    clients, peaks = np.array(points, dtype=float).T
    return float(np.polyfit(clients, peaks, 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10")
    parser.add_argument("--methods", default="drdfl,fedavg,dslth")
    parser.add_argument("--clients", default="10,20,50,100", help="comma-separated sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subset-train", type=int, default=5_000)
    parser.add_argument("--subset-test", type=int, default=1_000)
    parser.add_argument(
        "--participation", type=float, default=1.0, help="fraction of nodes that train a round"
    )
    parser.add_argument("--out", default="results/overhead")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        print(f"data folder {args.data_dir} not found; pass --data-dir", file=sys.stderr)
        return 2
    if args.rounds < 3:
        print("--rounds must be >= 3 (round 1 is start-up)", file=sys.stderr)
        return 2
    sizes = [int(c) for c in args.clients.split(",")]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cores = len(os.sched_getaffinity(0))
    rows = []
    for method in args.methods.split(","):
        for clients in sizes:
            cfg = RunConfig(
                method=method,
                dataset="cifar10",
                data_dir=str(Path(args.data_dir).resolve()),
                partitioner="dirichlet",
                dirichlet_beta=0.1,
                subset_train=args.subset_train,
                subset_test=args.subset_test,
                num_server_rounds=args.rounds,
                local_epochs=1,
                results_dir=args.out,
                run_name=f"overhead-{method}-{clients}-p{args.participation}",
                device="cpu",
                participation=args.participation,
            ).with_values(METHOD_KEYS.get(method, {}))
            sim_seconds, timings, sim_peak = simulated_rounds(cfg, clients)
            # the cores a round can use: one actor per core, one node per actor at a time
            workers = min(cores, max(1, round(args.participation * clients)))
            plain_seconds, plain_peak, idle = plain_rounds(cfg, clients, workers)
            sim = float(np.mean(sim_seconds[1:]))
            serial = float(np.mean(plain_seconds))  # the gaps between rounds 1..N: rounds 2..N
            floor = serial / workers
            barrier = floor + float(np.mean(idle))
            rows.append(
                (method, clients, sim, serial, floor, barrier, sim_peak, plain_peak, timings)
            )
            print(
                f"{method} x {clients}: simulation {sim:.1f} s/round (rounds: "
                f"{', '.join(f'{s:.1f}' for s in sim_seconds)}), plain serial {serial:.1f}, "
                f"floor {floor:.1f} on {workers} cores: {sim / floor:.2f}x the floor; "
                f"with the barriers' idle {barrier:.1f}: {sim / barrier:.2f}x; "
                f"peak PSS {sim_peak / 1024:.2f} GiB (plain loop {plain_peak / 1024:.2f} GiB)",
                flush=True,
            )
    print(
        f"\nCIFAR-10 {args.subset_train:,} train / {args.subset_test:,} test over the clients, "
        f"Dirichlet 0.1, small CNN, 1 local epoch, participation {args.participation}, "
        f"steady rounds 2..{args.rounds}, {cores} cores, "
        f"torch {torch.__version__}"
    )
    print(
        "| method | clients | simulation s/round | floor s/round | simulation / floor | "
        "floor + barrier idle | simulation / that | "
        "peak PSS simulation (GiB) | peak PSS plain loop (GiB) | simulation MiB per client |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == method]
        slope = per_client_mib([(r[1], r[6]) for r in mine])
        for _, clients, sim, _, floor, barrier, sim_peak, plain_peak, _ in mine:
            print(
                f"| {method} | {clients} | {sim:.1f} | {floor:.1f} | {sim / floor:.2f}x "
                f"| {barrier:.1f} | {sim / barrier:.2f}x "
                f"| {sim_peak / 1024:.2f} | {plain_peak / 1024:.2f} | {slope:.1f} |"
            )
    print("\nMean seconds per message inside the ClientApp (rounds 2..):")
    for method, clients, *_, timings in rows:
        print(
            f"  {method:7} x {clients:3}: "
            + ", ".join(f"{k.removeprefix('time_')} {v:.3f}" for k, v in timings.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
