"""What one hostile neighbour costs, and what a defence saves (issue 30, item 2).

Every (method, attack, defence) runs the same in-process federation (``run_ring``: the
server's own round loop over the app's ClientApp) on the same partitions and seed; the
run without an attacker is the reference. One attacker among the clients
(``--attacker``). Per run: the honest nodes' final expected Local-T against the
reference, how many of them lost more than ``--harm`` points, the mean loss, and in how
many rounds the honest mean was more than ``--harm`` below the reference's; and the
payloads the defence refused. The defence's
cost with no attacker is the reference's own row with the defence on.

    python benchmarks/attacks.py                      # digits, 10 clients, 8 rounds
    python benchmarks/attacks.py --methods fedavg,drdfl --attacks sign-flip --rounds 4
    python benchmarks/attacks.py --dataset cifar10    # 2,000 / 500 images, small CNN
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from drdfl_flwr.config import RunConfig
from drdfl_flwr.inprocess import run_ring
from drdfl_flwr.registry import method_spec

SCORE = "expected_local_t_acc"


def defence_for(method: str) -> dict:
    """The defence that fits the method's router: Flower's median on the hub, the
    bounded-trust merge on the ring."""
    if method_spec(method).centralized:
        return {"hub_reduction": "median"}
    return {"ring_defence": "outlier"}


def honest_curve(history: list[dict], attacker: int) -> tuple[np.ndarray, np.ndarray]:
    """(rounds x honest nodes) scores, and the last round's per node."""
    rows = []
    for record in history:
        nodes = record["nodes"]
        rows.append([n[SCORE] for k, n in enumerate(nodes) if k != attacker and n])
    curve = 100 * np.array(rows)
    return curve, curve[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="fedavg,drdfl,drdfl-average,dfml,dslth,dfedpgp")
    parser.add_argument("--attacks", default="sign-flip,scale,noise")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--attacker", type=int, default=3)
    parser.add_argument("--harm", type=float, default=2.0, help="points that count as harm")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", default="", help="cifar10/cifar100: default ../shared/datasets/<dataset>"
    )
    parser.add_argument("--subset-train", type=int, default=2000, help="images (not digits)")
    parser.add_argument("--subset-test", type=int, default=500, help="images (not digits)")
    args = parser.parse_args()
    data_keys = {}
    if args.dataset != "digits":  # the CPU-scale CIFAR setting of conf/cpu-bench.toml
        data_keys = {
            "data-dir": args.data_dir or f"../shared/datasets/{args.dataset}",
            "subset-train": args.subset_train,
            "subset-test": args.subset_test,
        }
    header = (
        "| method | attack | defence | honest nodes harmed | mean change (points) "
        "| rounds harmed | payloads refused | s |"
    )
    print(header)
    print("|" + " --- |" * 8)
    for name in args.methods.split(","):
        method, _, variant = name.partition("-average")
        extra = {"drdfl.learngene-merge": "average"} if name == "drdfl-average" else {}
        method = "drdfl" if name == "drdfl-average" else name
        base = RunConfig.from_run_config(
            {
                "method": method,
                "dataset": args.dataset,
                "seed": args.seed,
                "local-epochs": 1,
                "device": "cpu",
                **data_keys,
                **extra,
            }
        )
        defences = [("none", {})]
        if method != "dslth":  # bit-packed masks: no float distance, no hub
            defences.append(("on", defence_for(method)))
        reference = None
        for defence, defence_keys in defences:
            for attack in ["none", *args.attacks.split(",")]:
                keys = dict(defence_keys)
                if attack != "none":
                    keys.update(attack=attack, attack_partitions=str(args.attacker))
                cfg = base.replace(**keys)
                started = time.perf_counter()
                ring = run_ring(cfg, args.clients, args.rounds)
                seconds = time.perf_counter() - started
                curve, last = honest_curve(ring.history, args.attacker)
                refused = sum(
                    n.get("payloads_rejected", 0.0) for r in ring.history for n in r["nodes"] if n
                )
                if reference is None:
                    reference = (curve, last)
                ref_curve, ref_last = reference
                change = last - ref_last
                harmed = int((change < -args.harm).sum())
                rounds = int((curve.mean(1) < ref_curve.mean(1) - args.harm).sum())
                print(
                    f"| {name} | {attack} | {defence} | {harmed}/{len(last)} | "
                    f"{change.mean():+.2f} | {rounds}/{args.rounds} | {refused:.0f} | "
                    f"{seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
