"""Do DRDFL-VF's received class moments describe the node's own feature space? With and
without the alignment (``drdfl-vf.align``), on a small CIFAR-10 ring (4 nodes, shards of
5 classes, 1,000 training images, 1 epoch a round): after the last round, for every
node and every class it lacks, the distance between the class mean the ring told it and
the mean of that class's real test images through the node's own trunk (against the
within-class spread per feature), and the node's absent-class accuracy beside the
oracle head's (``health_vf_oracle_absent_acc``). Nodes run one after another in this
process (:func:`drdfl_flwr.node.node_round`), each receiving its predecessor's payload.

    python benchmarks/vf_alignment.py --rounds 3
    python benchmarks/vf_alignment.py --rounds 3 --trunk-lr-scale 1.0
    python benchmarks/vf_alignment.py --rounds 8 --no-align-row --calibration-steps 200,800
    python benchmarks/vf_alignment.py --rounds 8 --no-align-row --heads
    python benchmarks/vf_alignment.py --smoke      # digits, 2 rounds
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.methods.drdfl_vf import DRDFLVFOptions, moments_of
from drdfl_flwr.node import node_round
from drdfl_flwr.payload import peers
from drdfl_flwr.registry import build_learner

NODES = 4


def ring(cfg: RunConfig, rounds: int) -> tuple[dict[str, float], list, list]:
    data = [load_client_data(cfg, p, NODES) for p in range(NODES)]
    k = data[0].num_classes
    nodes = [build_learner(cfg, data[0].input_shape, k, p) for p in range(NODES)]
    sent: list = [None] * NODES
    metrics = []
    for r in range(1, rounds + 1):
        replies = [
            node_round(n, peers(sent[p - 1]) if sent[p - 1] else [], data[p], r, r == rounds)
            for p, n in enumerate(nodes)
        ]
        sent = [reply.payload for reply in replies]
        metrics = [reply.metrics for reply in replies]
    gaps, spreads = [], []
    for node, own in zip(nodes, data, strict=True):
        count, real_mean, real_var = moments_of(
            node.features(own.x_global_test), own.y_global_test, k
        )
        absent = (torch.bincount(own.y_train, minlength=k) == 0) & (count > 0)
        absent &= node.ring.count > 0
        gaps += (real_mean[absent] - node.ring.mean[absent]).norm(dim=1).tolist()
        spreads += real_var[absent].sqrt().mean(dim=1).tolist()

    def mean_of(key: str) -> float:
        values = [m[key] for m in metrics if key in m]
        return sum(values) / max(len(values), 1)

    row = {
        "gap": sum(gaps) / max(len(gaps), 1),
        "gap_max": max(gaps, default=0.0),
        "spread": sum(spreads) / max(len(spreads), 1),
        "absent": mean_of("absent_class_acc"),
        "oracle": mean_of("health_vf_oracle_absent_acc"),
        "r2": mean_of("health_vf_align_r2"),
        "local_t": mean_of("expected_local_t_acc"),
        "global_t": mean_of("global_t_balanced_acc"),
    }
    return row, nodes, data


def fit_head(
    node, features: torch.Tensor, y: torch.Tensor, virtual: bool, real_weight: float
) -> nn.Module:
    """A linear head from zero on the node's trunk features: virtual draws from the
    ring's moments of every class it knows (as the method's calibration draws them)
    and/or the given real features."""
    torch.manual_seed(0)
    head = nn.Linear(features.shape[1], node.num_classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=node.vf_opts.calibration_lr)
    known = node.ring.known()
    for _ in range(node.vf_opts.calibration_steps):
        loss = torch.zeros(())
        if virtual:
            draw, labels = node.ring.draw(known, node.vf_opts.virtual_per_class)
            loss = loss + F.cross_entropy(head(draw), labels)
        if real_weight:
            loss = loss + real_weight * F.cross_entropy(head(features), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def head_choices(nodes: list, data: list) -> dict[str, dict[str, float]]:
    """Other heads on the same trunks, read on the odd half of the common test set (the
    oracle fits on the even half): is the calibration or the trunk the limit?"""
    rows: dict[str, list[dict[str, float]]] = {}
    for node, own in zip(nodes, data, strict=True):
        k = node.num_classes
        test = node.features(own.x_global_test)
        y = own.y_global_test
        fit, read = torch.arange(0, len(y), 2), torch.arange(1, len(y), 2)
        prior = torch.bincount(own.y_train, minlength=k).float() / len(own.y_train)
        train = node.features(own.x_train)
        heads = {
            "the method's (calibrated, warm)": node.classifier.head,
            "from zero, virtual only": fit_head(node, train, own.y_train, True, 0.0),
            "from zero, virtual + real x 0.25": fit_head(node, train, own.y_train, True, 0.25),
            "oracle: real features of every class": fit_head(node, test[fit], y[fit], False, 1.0),
        }
        for name, head in heads.items():
            with torch.no_grad():
                logits = head(test[read])
                hit = (logits.argmax(1) == y[read]).float()
                local = ((logits + prior.clamp_min(1e-12).log()).argmax(1) == y[read]).float()
            per_class = torch.stack([hit[y[read] == c].mean() for c in range(k)])
            local_class = torch.stack([local[y[read] == c].mean() for c in range(k)])
            rows.setdefault(name, []).append(
                {
                    "balanced": per_class.mean().item(),
                    "absent": per_class[prior == 0].mean().item(),
                    "own": per_class[prior > 0].mean().item(),
                    "expected_local": (prior * local_class).sum().item(),
                }
            )
    return {
        name: {key: sum(r[key] for r in values) / len(values) for key in values[0]}
        for name, values in rows.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trunk-lr-scale", type=float, default=0.1)
    parser.add_argument(
        "--calibration-steps", default="", help="comma-separated drdfl-vf.calibration-steps"
    )
    parser.add_argument(
        "--no-align-row", action="store_true", help="leave out the rows without alignment"
    )
    parser.add_argument(
        "--heads", action="store_true", help="after the last row, other heads on its trunks"
    )
    parser.add_argument("--smoke", action="store_true", help="digits, 2 rounds (a test)")
    args = parser.parse_args(argv)
    if args.smoke:
        base = RunConfig(dataset="digits", partitioner="shard", classes_per_client=5)
        args.rounds = 2
    else:
        base = RunConfig(
            dataset="cifar10",
            data_dir=args.data_dir,
            partitioner="shard",
            classes_per_client=5,
            subset_train=1000,
            subset_test=1000,
            classifier="small-cnn",
            classifier_norm="batch",
        )
    base = base.replace(method="drdfl-vf", local_epochs=1, device="cpu", seed=0)
    print(
        f"{base.dataset}, {NODES} nodes, shards of 5 classes, {args.rounds} rounds, "
        f"trunk-lr-scale {args.trunk_lr_scale}"
    )
    print(
        "| align | calibration steps | absent means from the real ones, mean [max] | "
        "within-class spread | absent-class acc | oracle head | map R^2 | expected Local-T "
        "| balanced Global-T |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    default = str(DRDFLVFOptions.calibration_steps)
    steps = [int(s) for s in (args.calibration_steps or default).split(",")]
    for align, calibration_steps in [(a, s) for a in (False, True) for s in steps]:
        if (args.no_align_row or args.smoke) and not align:
            continue
        torch.manual_seed(0)
        section = {
            "align": align,
            "trunk-lr-scale": args.trunk_lr_scale,
            "calibration-steps": calibration_steps,
        }
        cfg = base.replace(sections={"drdfl-vf": section})
        row, nodes, data = ring(cfg, args.rounds)
        r2 = f"{row['r2']:.3f}" if align else ""
        print(
            f"| {str(align).lower()} | {calibration_steps} | "
            f"{row['gap']:.2f} [{row['gap_max']:.2f}] | {row['spread']:.2f} | "
            f"{row['absent']:.3f} | {row['oracle']:.3f} | {r2} | {row['local_t']:.3f} | "
            f"{row['global_t']:.3f} |"
        )
    if args.heads:
        print("\nOther heads on the last row's trunks (odd half of the test set, mean over nodes):")
        print("| head | balanced acc | absent classes | own classes | expected Local-T |")
        print("|---|---|---|---|---|")
        for name, score in head_choices(nodes, data).items():
            print(
                f"| {name} | {score['balanced']:.3f} | {score['absent']:.3f} | "
                f"{score['own']:.3f} | {score['expected_local']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
