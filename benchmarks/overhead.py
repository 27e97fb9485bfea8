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
2. the same work as a plain single-process PyTorch loop (:func:`plain_loop`, this
   benchmark's own: the library's in-process federation runs the real round loop and
   ClientApp, wire format included, and is no floor): the same learners, data, seeds,
   node rounds (:func:`drdfl_flwr.node.node_round`), ring payloads or hub aggregates
   (the method's reducer) and evaluation, one thread, nodes one after another, state
   kept in memory, the drawn nodes taking part (``--participation``). Its steady seconds per
   round are the serial cost; divided by the cores the simulation used, the parallel
   floor (perfect scaling, zero overhead). The plain loop is pinned to one core.

Two more yardsticks, because this machine's two vCPUs are not two equal cores (core 0
alone runs a pass in 2.5 s, core 1 in 3.3 s, and both at once take 3.1 and 3.3 s: together
they do 1.6x what core 0 does alone, not 2x): the floor at the measured speedup (a
calibration pass on each core alone and on all at once, :func:`core_speedup`), and the
ClientApps' own seconds per core in the same run (:func:`app_seconds`: the ``time_*``
laps they report), which no drift of the host between two measurements can move.

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
import copy
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
from drdfl_flwr.intake import take_in
from drdfl_flwr.models.classifiers import SmallCNN, norm_layer
from drdfl_flwr.node import evaluation_metrics, node_round
from drdfl_flwr.payload import from_hub, peers
from drdfl_flwr.registry import build_learner, hub_reducer
from drdfl_flwr.simulation import simulate
from drdfl_flwr.vce_delivery import KEEP_FLOWERS
from strategies.membership import sample_participants
from strategies.reducers import Contribution, reduce_screened
from strategies.rounds import AGGREGATE_PREFIX

# Each method as the comparison runs it: DSLTH trains local-epochs epochs of its steps
# (its released procedure is one step per round, which would time the framework alone).
METHOD_KEYS = {"dslth": {"dslth.procedure": "epochs"}}
PLAIN_CORE = 0  # the core the plain loop runs on, pinned


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


def simulated_rounds(
    cfg: RunConfig, clients: int
) -> tuple[list[float], dict, float, list[float], float]:
    """Per-round seconds, mean per-message timings (rounds 2..), the peak PSS, per round
    the ClientApps' own seconds (:func:`app_seconds`), and the seconds discovery took."""
    driver_cpu = time.process_time()
    with PeakMemory() as memory:
        simulate(cfg, clients, cpus_per_client=1.0)
    driver_cpu = time.process_time() - driver_cpu
    metrics = Path(cfg.results_dir) / cfg.run_name / "metrics.jsonl"
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    steady = rounds[1:] or rounds
    timings = {
        key: float(np.mean([r["mean"][key] for r in steady if key in r["mean"]]))
        for key in steady[0]["mean"]
        if key.startswith("time_") or key == "warm_start"
    }
    print(f"  simulation peak by process (MiB): {memory.breakdown()}", flush=True)
    print(
        f"  the driver (ServerApp, Flower's engine threads) used {driver_cpu:.1f} CPU s, "
        f"{driver_cpu / len(rounds):.2f} per round",
        flush=True,
    )
    return (
        [r["seconds"] for r in rounds],
        timings,
        memory.peak_mib,
        [app_seconds(r) for r in rounds],
        float(rounds[0].get("discovery_seconds", float("nan"))),
    )


def plain_loop(cfg: RunConfig, clients: int, on_round) -> None:
    """The apps' work with nothing around it: each round the drawn nodes, in ring order,
    take in their nearest drawn predecessor's last payload (a hub method: the previous
    aggregate), train and score (:func:`node_round`); a hub method's replies are reduced
    by its reducer and every drawn node scores the fresh aggregate on a copy, as the
    hub's evaluation message has it done. Ring and star only; no joins, no failures."""
    data = [load_client_data(cfg, k, clients) for k in range(clients)]
    learners = [build_learner(cfg, d.input_shape, d.num_classes, k) for k, d in enumerate(data)]
    reducer, reduced, aggregate, weight = hub_reducer(cfg), None, None, 0.0
    outbox: dict[int, dict] = {}
    for r in range(1, cfg.num_server_rounds + 1):
        drawn = sample_participants(cfg.seed, r, clients, cfg.participation)
        sent = {}
        for i, k in enumerate(drawn):
            before = outbox.get(drawn[i - 1]) if len(drawn) > 1 else None
            incoming = aggregate or (peers(before) if before and reducer is None else [])
            sent[k] = node_round(learners[k], incoming, data[k], r)
        outbox.update({k: result.payload for k, result in sent.items()})
        if reducer is not None:
            replies = [
                Contribution(k, {n: t.numpy() for n, t in res.payload.items()}, res.metrics)
                for k, res in sent.items()
                if res.payload
            ]
            reduction = reduce_screened(reducer, replies, reduced)
            if reduction.aggregate is not None:
                reduced, weight = reduction.aggregate, reduction.weight
            tensors = {n: torch.from_numpy(np.array(a)) for n, a in (reduced or {}).items()}
            aggregate = from_hub(tensors, weight) if reduced else None
            for k in drawn if reduced else []:  # the hub's evaluation message, not kept
                trial = copy.deepcopy(learners[k])
                take_in(trial, aggregate, r)
                evaluation_metrics(trial, data[k])
        on_round(r)


def plain_rounds(cfg: RunConfig, clients: int, core: int) -> tuple[list[float], float]:
    """The same rounds in a plain loop, one thread, pinned to ``core`` (so that the
    calibration below knows which core's speed it ran at): per-round seconds and the
    peak PSS."""
    torch.set_num_threads(1)
    marks: list[float] = []
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        with PeakMemory() as memory:
            plain_loop(cfg, clients, on_round=lambda _: marks.append(time.perf_counter()))
    finally:
        os.sched_setaffinity(0, allowed)
    return list(np.diff(marks)), memory.peak_mib


def app_seconds(record: dict) -> float:
    """Seconds the round's ClientApps spent in their own code (every ``time_*`` lap of
    every node, the hub's evaluation message's ``aggregate_time_*`` too)."""
    return sum(
        seconds
        for node in record["nodes"].values()
        for key, seconds in node.items()
        if key.startswith(("time_", AGGREGATE_PREFIX + "time_"))
    )


def _calibration_pass(core: int | None, results) -> None:
    """A fixed piece of the plain loop's kind of work (the runs' small CNN scoring 1,000
    CIFAR-sized images, one thread), timed on ``core``."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = SmallCNN(3, 32, 32, 10, norm_layer("batch")).eval()
    images = torch.rand(1000, 3, 32, 32)
    with torch.no_grad():
        net(images[:100])
        started = time.perf_counter()
        for _ in range(6):
            for batch in images.split(250):
                net(batch)
    results.put((core, time.perf_counter() - started))


def core_speedup(core: int, cores: int) -> tuple[float, dict[int, float], dict[int, float]]:
    """How much more the ``cores`` cores do together than ``core`` alone: the same pass
    on ``core`` alone, then on every core at once (one process each, pinned). The
    floor's ``serial / cores`` assumes ``cores`` x; this machine's vCPUs differ in speed
    and slow each other down (measured: 1.6 x with 2)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()

    def run(pinned: list[int]) -> dict[int, float]:
        workers = [context.Process(target=_calibration_pass, args=(c, results)) for c in pinned]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return dict(results.get() for _ in workers)

    alone = {c: run([c])[c] for c in range(cores)}
    together = run(list(range(cores)))
    return sum(alone[core] / t for t in together.values()), together, alone


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
    parser.add_argument(
        "--partitioner", default="dirichlet", help="dirichlet, dirichlet-client or shard"
    )
    parser.add_argument(
        "--idle-state", default="memory", help="memory or disk: where idle nodes' state waits"
    )
    parser.add_argument("--eval-every", type=int, default=1, help="score every N rounds")
    parser.add_argument(
        "--no-plain",
        action="store_true",
        help="skip the plain loop (its floors): the ClientApps' own seconds are the yardstick",
    )
    parser.add_argument(
        "--flower-extractor",
        action="store_true",
        help="keep Flower's own message extractor (the before of drdfl_flwr/vce_delivery.py)",
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
    if args.flower_extractor:
        os.environ[KEEP_FLOWERS] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cores = len(os.sched_getaffinity(0))
    speedup, together, alone = core_speedup(PLAIN_CORE, cores)
    print(
        f"calibration: one pass alone on core {PLAIN_CORE}: {alone[PLAIN_CORE]:.2f} s, "
        + ", ".join(f"core {c} alone {t:.2f} s" for c, t in alone.items() if c != PLAIN_CORE)
        + "; all at once: "
        + ", ".join(f"core {c} {t:.2f} s" for c, t in together.items())
        + f" -> {cores} cores do {speedup:.2f}x what core {PLAIN_CORE} does alone",
        flush=True,
    )
    rows = []
    for method in args.methods.split(","):
        for clients in sizes:
            cfg = RunConfig(
                method=method,
                dataset="cifar10",
                data_dir=str(Path(args.data_dir).resolve()),
                partitioner=args.partitioner,
                dirichlet_beta=0.1,
                classes_per_client=2,
                idle_state=args.idle_state,
                eval_every=args.eval_every,
                subset_train=args.subset_train,
                subset_test=args.subset_test,
                num_server_rounds=args.rounds,
                local_epochs=1,
                results_dir=args.out,
                run_name=f"overhead-{method}-{clients}-p{args.participation}",
                device="cpu",
                participation=args.participation,
            ).with_values(METHOD_KEYS.get(method, {}))
            sim_seconds, timings, sim_peak, in_apps, discovery = simulated_rounds(cfg, clients)
            # the cores a round can use: one actor per core, one node per actor at a time
            workers = min(cores, max(1, round(args.participation * clients)))
            if args.no_plain:
                plain_seconds, plain_peak = [float("nan")], float("nan")
            else:
                plain_seconds, plain_peak = plain_rounds(cfg, clients, PLAIN_CORE)
            sim = float(np.mean(sim_seconds[1:]))
            serial = float(np.mean(plain_seconds))  # the gaps between rounds 1..N: rounds 2..N
            floor = serial / workers
            attainable = serial / (speedup if workers == cores else 1.0)
            own = float(np.mean(in_apps[1:])) / workers  # the apps' seconds per core
            rows.append(
                (
                    method,
                    clients,
                    sim,
                    floor,
                    attainable,
                    own,
                    sim_peak,
                    plain_peak,
                    discovery,
                    timings,
                )
            )
            print(
                f"{method} x {clients}: simulation {sim:.1f} s/round (rounds: "
                f"{', '.join(f'{s:.1f}' for s in sim_seconds)}), plain serial {serial:.1f} "
                f"(rounds 2..: {', '.join(f'{s:.1f}' for s in plain_seconds)}), "
                f"floor {floor:.1f} on {workers} cores: {sim / floor:.2f}x; the floor at "
                f"this machine's {speedup:.2f}x: {attainable:.1f}, {sim / attainable:.2f}x; "
                f"the ClientApps' own seconds per core {own:.1f}: {sim / own:.2f}x; "
                f"peak PSS {sim_peak / 1024:.2f} GiB (plain loop {plain_peak / 1024:.2f} GiB), "
                f"discovery {discovery:.1f} s",
                flush=True,
            )
    print(
        f"\nCIFAR-10 {args.subset_train:,} train / {args.subset_test:,} test over the clients, "
        f"{args.partitioner} (Dirichlet 0.1, shards of 2 classes), small CNN, 1 local epoch, "
        f"participation {args.participation}, idle state in {args.idle_state}, "
        f"{'Flower' if args.flower_extractor else 'drdfl_flwr.vce_delivery'}'s message "
        "extractor, "
        f"steady rounds 2..{args.rounds}, {cores} cores, "
        f"torch {torch.__version__}"
    )
    print(
        "| method | clients | simulation s/round | floor (serial / cores) | ratio | "
        f"floor at {speedup:.2f}x | ratio | ClientApps' own s per core | ratio | "
        "peak PSS simulation (GiB) | peak PSS plain loop (GiB) | simulation MiB per client "
        "| discovery (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == method]
        slope = per_client_mib([(r[1], r[6]) for r in mine])
        for _, clients, sim, floor, attainable, own, sim_peak, plain_peak, found, _ in mine:
            print(
                f"| {method} | {clients} | {sim:.1f} | {floor:.1f} | {sim / floor:.2f}x "
                f"| {attainable:.1f} | {sim / attainable:.2f}x | {own:.1f} | {sim / own:.2f}x "
                f"| {sim_peak / 1024:.2f} | {plain_peak / 1024:.2f} | {slope:.1f} | {found:.1f} |"
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
