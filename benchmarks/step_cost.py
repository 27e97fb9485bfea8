"""DRDFL's local training step beside a classifier-only step, with ResNet-18 (the paper's
Table 6: the modules DRDFL adds cost under 5 % of the classifier's time per batch of 32).

Measured here, on the same batches and the same ResNet-18 (CIFAR stem), in one process:

* classifier-only: the Local baseline's step (cross-entropy on the batch, Adam);
* the classifier's share of DRDFL: the same step on the batch and on a second batch of
  the same size (DRDFL trains its classifier on the real images and on the noisy
  reconstructions, two forward/backward passes);
* DRDFL: its whole step (Learngene, PersonaNet, decoder, class statistics, classifier,
  and the adversary's max step).

It prints seconds per batch (median of the timed steps after warm-up) and the ratios.

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
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import build_learner


def batch_data(batch_size: int, batches: int, num_classes: int = 10) -> ClientData:
    gen = torch.Generator().manual_seed(0)
    n = batch_size * batches
    x = torch.rand((n, 3, 32, 32), generator=gen) * 2 - 1
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return ClientData(x, y, x[:batch_size], y[:batch_size], x[:batch_size], y[:batch_size], 10)


def time_fit(method: str, data: ClientData, batch_size: int, steps: int) -> float:
    """Median seconds per optimizer step of ``method``'s fit, one batch per fit call."""
    cfg = RunConfig(
        method=method, classifier="resnet18", batch_size=batch_size, local_epochs=1, device="cpu"
    )
    learner = build_learner(cfg, (3, 32, 32), 10)
    batches = [_slice(data, i, batch_size) for i in range(0, len(data.y_train), batch_size)]
    times = []
    for batch in batches[: steps + 2]:
        started = time.perf_counter()
        learner.fit(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])  # two warm-up steps


def time_double_classifier(data: ClientData, batch_size: int, steps: int) -> float:
    """The classifier's work inside DRDFL's step: CE on two batches, one Adam step."""
    cfg = RunConfig(method="local", classifier="resnet18", device="cpu")
    learner = build_learner(cfg, (3, 32, 32), 10)
    model, optimizer = learner.classifier, learner.optimizer
    model.train()
    times = []
    for i in range(steps + 2):
        x = data.x_train[i * batch_size : (i + 1) * batch_size]
        y = data.y_train[i * batch_size : (i + 1) * batch_size]
        started = time.perf_counter()
        loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x + 0.1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def _slice(data: ClientData, start: int, size: int) -> ClientData:
    x, y = data.x_train[start : start + size], data.y_train[start : start + size]
    return ClientData(x, y, x, y, x, y, data.num_classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    data = batch_data(args.batch_size, args.steps + 2)
    classifier = time_fit("local", data, args.batch_size, args.steps)
    double = time_double_classifier(data, args.batch_size, args.steps)
    drdfl = time_fit("drdfl", data, args.batch_size, args.steps)
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
