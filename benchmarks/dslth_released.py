"""DSLTH as the MCE-PL release trains it (``conf/dslth-released.toml``), shared beside
isolated, through the real simulation on a CIFAR-10 subset.

    python benchmarks/dslth_released.py --rounds 60

The released procedure takes one SGD step per round, so short runs mostly show the
mechanism (masks moving, overlap with the received masks, bounded scores), not the
paper's accuracy (400 rounds).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from drdfl_flwr.config import RunConfig
from drdfl_flwr.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--subset-train", type=int, default=10000)
    parser.add_argument("--subset-test", type=int, default=2000)
    parser.add_argument("--out", default="results/released")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    for isolated in (False, True):
        cfg = RunConfig.from_toml(
            ROOT / "conf" / "dslth-released.toml",
            data_dir=str(Path(args.data_dir).resolve()),
            num_server_rounds=args.rounds,
            eval_every=max(1, args.rounds // 4),
            subset_train=args.subset_train,
            subset_test=args.subset_test,
            results_dir=args.out,
            run_name="dslth-released" + ("-isolated" if isolated else ""),
            isolated=isolated,
        )
        summary = simulate(cfg, args.clients)
        last = summary["last"]
        health = {k: round(v, 4) for k, v in summary["last_health"].items() if "." not in k}
        print(
            f"RESULT isolated={isolated}: Local-T {100 * last['local_t_acc']['mean']:.2f} ± "
            f"{100 * last['local_t_acc']['std']:.2f}, Global-T "
            f"{100 * last['global_t_acc']['mean']:.2f} ± {100 * last['global_t_acc']['std']:.2f}, "
            f"bytes/round/client {summary['mean_bytes_sent_per_client_per_round']:,.0f}, "
            f"health {json.dumps(health)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
