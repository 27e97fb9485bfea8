"""Communication in the paper's setting (ResNet-18, CIFAR-10, 20 clients), beside the
DRDFL paper's Table 1, measured from each method's real payload (no training needed).

For every registered method: the parameters and serialized bytes one client sends in
one round, and both times 20 clients (the paper's setting; its Table 1 figures are of
that order, so we read them as one round over 20 clients). DSLTH runs its released
AlexNet-style network (it has no ResNet-18 form); DisPFL and DFedPGP use GroupNorm as
their code does; FedBN uses BatchNorm. FedFed's payload changes by phase: the generator
rounds, the one-time feature share, then the classifier; the classifier phase is shown.
FedNova's first round also carries the common start point; the steady state is shown.
Bit-packed masks (DSLTH, DisPFL) count one "parameter" per byte of packed mask.

    python benchmarks/communication_table.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flwr.app import RecordDict

from baselines.fedfed import FedFedOptions
from drdfl_flwr import registry
from drdfl_flwr.config import RunConfig
from drdfl_flwr.payload import from_hub, num_parameters
from drdfl_flwr.records import to_array_record
from drdfl_flwr.registry import build_learner
from strategies.wire import OUT_PAYLOAD, content_bytes

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 20
# DRDFL paper, Table 1: communicated parameters (M) in the ResNet-18 setting.
PAPER_TABLE_1 = {
    "fedrep": 213.36,
    "fedbn": 213.06,
    "fednova": 213.46,
    "fedfed": 454.58,
    "dispfl": 106.65,
    "dfedpgp": 213.36,
    "cvae": 63.44,
    "drdfl": 0.58,
}
SETTINGS: dict[str, dict] = {
    "dslth": {"classifier": "alexnet-dslth"},
    "dispfl": {"classifier-norm": "group"},
    "dfedpgp": {"classifier-norm": "group"},
    "fedbn": {"classifier-norm": "batch"},
}


def payload_of(method: str) -> tuple[int, int]:
    paper = RunConfig.from_toml(ROOT / "conf" / "drdfl-paper.toml")  # latent sizes 64/64
    values = {**paper.to_run_config(), "method": method, "classifier": "resnet18"}
    values.update(SETTINGS.get(method, {}))
    cfg = RunConfig.from_run_config({**values, "device": "cpu"})
    learner = build_learner(cfg, (3, 32, 32), 10)
    if method == "fedfed":  # past the generator rounds: the classifier is what travels
        learner.rounds_trained = cfg.options(FedFedOptions).distill_rounds + 1
    if method == "fednova":  # after the first aggregate: no more start point (round one)
        learner.absorb(from_hub(learner.expected_aggregate()))
    payload = learner.shared_payload()
    if not payload:  # nothing leaves the node: nothing is sent (as the round loop counts)
        return 0, 0
    wire = content_bytes(RecordDict({OUT_PAYLOAD: to_array_record(payload)}))
    return num_parameters(payload), wire


def main() -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lines = [
        "| method | runs on | params/client/round | bytes/client/round | "
        f"params x {CLIENTS} clients (M) | paper Table 1 (M) |",
        "|---|---|---|---|---|---|",
    ]
    for method in registry.METHODS:
        spec = registry.method_spec(method)
        params, nbytes = payload_of(method)
        paper = PAPER_TABLE_1.get(method)
        lines.append(
            f"| {method} | {'hub' if spec.centralized else 'relay'} | {params:,} | {nbytes:,} "
            f"| {params * CLIENTS / 1e6:.2f} | {'' if paper is None else f'{paper:.2f}'} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
