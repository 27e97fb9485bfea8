"""DRDFL's local training step beside a classifier-only step, with ResNet-18 (the paper's
Table 6: the modules DRDFL adds cost under 5 % of the classifier's time per batch of 32).

Measured here, on the same batches and the same ResNet-18 (CIFAR stem), in one process:

* classifier-only: the Local baseline's step (cross-entropy on the batch, Adam);
* the classifier's share of DRDFL: the same step on the batch and on a second batch of
  the same size (DRDFL trains its classifier on the real images and on the noisy
  reconstructions, two forward/backward passes);
* DRDFL: its whole step (Learngene, PersonaNet, decoder, class statistics, classifier,
  and the adversary's max step), without the health metrics computed once per round.

The three are interleaved batch by batch; it prints seconds per batch (median after two
warm-up batches) and the ratios.

    python benchmarks/step_cost.py --batch-size 32 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from drdfl_flwr.config import RunConfig
from drdfl_flwr.registry import build_learner


def learners(batch_size: int):
    """ResNet-18 (CIFAR stem) learners for Local and DRDFL, as a run would build them."""
    built = {}
    for method in ("local", "drdfl"):
        cfg = RunConfig(method=method, classifier="resnet18", batch_size=batch_size, device="cpu")
        built[method] = build_learner(cfg, (3, 32, 32), 10)
    return built["local"], built["drdfl"]


def classifier_step(learner, x: torch.Tensor, y: torch.Tensor, passes: int) -> None:
    """Cross-entropy on ``passes`` batches (DRDFL: the real one and the noisy
    reconstructions), one Adam step."""
    model, optimizer = learner.classifier, learner.optimizer
    model.train()
    loss = sum(F.cross_entropy(model(x + 0.01 * p), y) for p in range(passes))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def drdfl_step(learner, x: torch.Tensor, y: torch.Tensor) -> None:
    """One batch of DRDFL's fit: the adversary's max step, then the min step of every
    other block (without the once-per-round health metrics)."""
    learner.set_training(True)
    learner.adversary_step(x, y)
    learner.main_step(x, y)


def median_seconds(steps: dict, batches: list, warmup: int = 2) -> dict[str, float]:
    """Each step on each batch, interleaved (a slow moment of the machine hits all three
    alike); medians after the warm-up."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, (x, y) in enumerate(batches):
        for name, step in steps.items():
            started = time.perf_counter()
            step(x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.rand((args.batch_size, 3, 32, 32), generator=gen) * 2 - 1,
            torch.randint(0, 10, (args.batch_size,), generator=gen),
        )
        for _ in range(args.steps + 2)
    ]
    local, drdfl_learner = learners(args.batch_size)
    medians = median_seconds(
        {
            "classifier": lambda x, y: classifier_step(local, x, y, passes=1),
            "double": lambda x, y: classifier_step(local, x, y, passes=2),
            "drdfl": lambda x, y: drdfl_step(drdfl_learner, x, y),
        },
        batches,
    )
    classifier, double, drdfl = medians["classifier"], medians["double"], medians["drdfl"]
    extra = drdfl - double
    print(
        f"ResNet-18, batch {args.batch_size}, CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; median seconds per step over {args.steps} steps"
    )
    print("| step | s/batch | vs classifier-only |")
    print("|---|---|---|")
    print(f"| classifier-only (Local) | {classifier:.3f} | 1.00x |")
    print(f"| classifier on real + noisy batch | {double:.3f} | {double / classifier:.2f}x |")
    print(f"| DRDFL, whole step | {drdfl:.3f} | {drdfl / classifier:.2f}x |")
    print(
        f"\nDRDFL's modules besides its classifier: {extra:.3f} s/batch = "
        f"{extra / double:.1%} of its classifier's time (paper's Table 6: 0.08 / 2.12 = 3.8 %); "
        f"DRDFL's whole step is {drdfl / classifier:.2f}x a classifier-only step."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
