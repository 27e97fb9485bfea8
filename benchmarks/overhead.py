"""What the simulation adds to the training: seconds per round and peak memory, side by side.

For each method, in one process, one after the other:

1. the simulation (Flower's Ray engine through ``drdfl_flwr.simulation.simulate``, one
   CPU per client actor): steady-state seconds per round = the mean over rounds 2.. (the
   first round pays Ray start-up, node discovery and data decoding), and the peak
   proportional set size (PSS) summed over every process of the job (this driver, Ray's
   GCS and raylet, every worker), sampled every second (a sample walks /proc: about
   25 ms of one core, so sampling faster would itself slow the job down);
2. the same work as a plain single-process PyTorch loop: the same learners, data, seeds,
   ring payloads, training and evaluation, one thread, nodes one after another, state
   kept in memory. Its steady seconds per round are the serial cost; divided by the cores
   the simulation used, the parallel floor (perfect scaling, zero overhead).

The ratio simulation / floor is the framework's overhead (1.00 = none). Where the
simulation's time goes is shown from the per-message timings the ClientApp reports
(``time_*`` metrics: restoring state, absorbing, training, saving, evaluating).

    python benchmarks/overhead.py --data-dir ../shared/datasets/cifar10 \\
        --methods local,drdfl --clients 20 --subset-train 10000 --rounds 3
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
from drdfl_flwr.data import load_client_data
from drdfl_flwr.node import node_round
from drdfl_flwr.payload import PEER, Incoming
from drdfl_flwr.registry import build_learner
from drdfl_flwr.simulation import simulate


class PeakMemory:
    """Peak total PSS (MiB) of this process and all its descendants, sampled in a thread.
    PSS splits shared pages among the processes sharing them, so the sum is the job's
    real footprint (RSS would count torch's shared libraries once per worker)."""

    def __init__(self, interval: float = 1.0) -> None:
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


def plain_rounds(cfg: RunConfig, clients: int) -> tuple[list[float], float]:
    """The same rounds in a plain loop (:func:`node_round`, as the ClientApp runs a round):
    ring payloads of the previous round, take in, train, evaluate."""
    torch.set_num_threads(1)
    with PeakMemory() as memory:
        data = [load_client_data(cfg, p, clients) for p in range(clients)]
        learners = [
            build_learner(cfg, data[p].input_shape, data[p].num_classes, p) for p in range(clients)
        ]
        payloads: list[dict] = [{} for _ in range(clients)]
        seconds = []
        for server_round in range(1, cfg.num_server_rounds + 1):
            started = time.perf_counter()
            sent = []
            for p, learner in enumerate(learners):
                q = (p - 1) % clients
                weight = float(len(data[q].y_train))
                incoming = [Incoming(payloads[q], q, weight, PEER)] if payloads[q] else []
                # the node's round exactly as the ClientApp runs it
                sent.append(node_round(learner, incoming, data[p], server_round).payload)
            payloads = sent
            seconds.append(time.perf_counter() - started)
    return seconds, memory.peak_mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10")
    parser.add_argument("--methods", default="local,drdfl")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subset-train", type=int, default=10_000)
    parser.add_argument("--subset-test", type=int, default=2_000)
    parser.add_argument("--out", default="results/overhead")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        print(f"data folder {args.data_dir} not found; pass --data-dir", file=sys.stderr)
        return 2
    if args.rounds < 2:
        print("--rounds must be >= 2 (round 1 is start-up)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cores = len(os.sched_getaffinity(0))
    rows = []
    for method in args.methods.split(","):
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
            run_name=f"overhead-{method}",
            device="cpu",
        )
        sim_seconds, timings, sim_peak = simulated_rounds(cfg, args.clients)
        plain_seconds, plain_peak = plain_rounds(cfg, args.clients)
        sim = float(np.mean(sim_seconds[1:]))
        serial = float(np.mean(plain_seconds[1:]))
        floor = serial / min(cores, args.clients)
        rows.append((method, sim, serial, floor, sim_peak, plain_peak, timings, sim_seconds))
        print(
            f"{method}: simulation {sim:.1f} s/round (rounds: "
            f"{', '.join(f'{s:.1f}' for s in sim_seconds)}), plain serial {serial:.1f}, "
            f"floor {floor:.1f} on {cores} cores: {sim / floor:.2f}x the floor; "
            f"peak PSS {sim_peak / 1024:.2f} GiB (plain loop {plain_peak / 1024:.2f} GiB)",
            flush=True,
        )
    print(
        f"\n{args.clients} clients, CIFAR-10 {args.subset_train:,} train / "
        f"{args.subset_test:,} test, Dirichlet 0.1, small CNN, 1 local epoch, {cores} cores, "
        f"torch {torch.__version__}"
    )
    print(
        "| method | simulation s/round | plain serial s/round | floor s/round | "
        "simulation / floor | peak PSS simulation (GiB) | peak PSS plain loop (GiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, sim, serial, floor, sim_peak, plain_peak, _, _ in rows:
        print(
            f"| {method} | {sim:.1f} | {serial:.1f} | {floor:.1f} | {sim / floor:.2f}x "
            f"| {sim_peak / 1024:.2f} | {plain_peak / 1024:.2f} |"
        )
    print("\nMean seconds per message inside the ClientApp (rounds 2..):")
    for method, *_, timings, _ in rows:
        print(
            f"  {method:8} "
            + ", ".join(f"{k.removeprefix('time_')} {v:.3f}" for k, v in timings.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
