"""Does Algorithm 2 give a late joiner a head start? (DRDFL paper, Appendix B.2.6, Fig. 10)

    python benchmarks/late_join.py [--clients 6] [--join-round 9] [--rounds 16]

A ring of ``clients`` DRDFL nodes on digits trains in process (drdfl_flwr.inprocess);
the last node appears at ``join-round``. Variants, each the same ring, seeds and data:
``algorithm-2`` (received Learngene and class statistics, fresh private modules, priors
fixed for 5 rounds), ``no-freeze`` (the same start, priors free at once) and ``absorb``
(the control: the newcomer takes its first payload like any node, so it keeps its own
initial priors and moves 1 % toward the received ones). Prints the newcomer's Local-T
and Global-T over its first rounds, how far its class means sit from its predecessor's at
the end, and the other nodes' mean Local-T (joining must not hurt them)."""

from __future__ import annotations

import argparse

from drdfl_flwr.config import RunConfig
from drdfl_flwr.inprocess import run_ring

VARIANTS = {
    "algorithm-2": {},
    "no-freeze": {"drdfl.join-frozen-rounds": 0},
    "absorb": {"drdfl.late-join": "absorb"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--join-round", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    joiner = args.clients - 1
    shown = range(args.join_round, args.rounds + 1)
    print(
        f"DRDFL on digits, {args.clients} nodes in a ring, node {joiner} joins in round "
        f"{args.join_round}, {args.rounds} rounds, seed {args.seed}"
    )
    print(
        f"{'variant':12} {'newcomer Local-T % by round ' + str(list(shown)):>60}  "
        f"{'Global-T % (first, last)':>24}  {'|mu - pred mu|, last':>20}  others' Local-T %"
    )
    for name, changes in VARIANTS.items():
        cfg = RunConfig.from_run_config(
            {"dataset": "digits", "device": "cpu", "seed": args.seed, **changes}
        )
        ring = run_ring(cfg, args.clients, args.rounds, joins={joiner: args.join_round})
        history = ring.history
        local = [100 * history[r - 1]["nodes"][joiner]["local_t_acc"] for r in shown]
        global_t = [100 * history[r - 1]["nodes"][joiner]["global_t_acc"] for r in shown]
        others = [
            100 * history[-1]["nodes"][k]["local_t_acc"] for k in range(args.clients) if k != joiner
        ]
        gap = (ring.learners[joiner].stats.mu - ring.learners[joiner - 1].stats.mu).detach()
        print(
            f"{name:12} {' '.join(f'{a:5.1f}' for a in local):>60}  "
            f"{global_t[0]:11.1f} {global_t[-1]:12.1f}  {float(gap.norm(dim=1).mean()):20.3f}  "
            f"{sum(others) / len(others):.1f}"
        )


if __name__ == "__main__":
    main()
