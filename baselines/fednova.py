"""FedNova (Wang et al. 2020, arXiv 2007.07481; code JYWa/FedNova, also the FedNova of
visitworld123/FedFed): normalized averaging, so that nodes running different numbers of
local steps do not pull the global model toward their own objective.

Every round node i starts from the global model x^t, runs tau_i local SGD steps with
momentum rho (tau_i = epochs x batches: a node with more data runs more steps) and
sends its cumulative change divided by the norm of its step coefficients,
d_i = (x^t - x_i) / ||a_i||_1 with ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)]
/ (1 - rho) (tau_i for rho = 0), the closed form of JYWa/FedNova's recursion
c <- rho c + 1, a <- a + c. The hub (``strategies.reducers.fednova``) forms
x^{t+1} = x^t - tau_eff sum_i p_i d_i with p_i = n_i / n and tau_eff = sum_i p_i ||a_i||_1,
and every node loads x^{t+1} when it arrives (the hub's message of round t carries the
aggregate of round t - 1).

Wire format (what the reducer consumes): ``update.<k>`` = d_i for every parameter of
the classifier; ``start.<k>`` = x^t while the node has received no aggregate yet (round
one: the hub has no x yet, and every node starts from the same seeded initialization,
``Learner.common_init``, so the start points agree bit for bit); the
fit metric ``fednova_a`` = ||a_i||_1 (the ClientApp adds ``num-examples``). The hub's
aggregate is ``model.<k>`` for every floating-point state entry.

Choices and deviations:

- Optimizer: plain SGD with momentum (``[fednova]`` ``lr = 0.01``, ``momentum = 0.9``,
  the FedFed release's defaults), not the project's common Adam: ||a_i||_1 is derived
  for SGD with (heavy-ball) momentum, and Adam's per-coordinate step sizes have no such
  closed form. The momentum buffer starts at zero every round (a fresh optimizer per
  round), as the closed form assumes; no weight decay and no proximal term (mu = 0) and
  no server momentum (``gmf = 0``).
- BatchNorm running statistics (``classifier-norm = batch``) are not optimized by SGD, so
  step normalization does not apply to them (JYWa/FedNova normalizes the optimizer's
  parameters only): they travel as ``mean.<k>`` and the hub averages them by examples,
  as FedAvg does. The integer ``num_batches_tracked`` stays on the node.
- Local-T / Global-T score the node's classifier after its local round (trained from
  x^t), the one evaluation point of every method (the DRDFL paper's Table 2 FedNova row,
  90.8 Local-T, only makes sense so); the fresh x^{t+1} is scored apart, as every hub
  method's, under ``aggregate_local_t_acc`` / ``aggregate_global_t_acc``.
- If a node refuses an aggregate (a bad payload), it trains from the last x it accepted:
  its update is then relative to an older model than the hub applies it to. The hub
  keeps every node in step otherwise.

Metrics: ``local_steps`` (tau_i), ``fednova_a`` and ``health_update_norm`` = ||d_i||_2,
the size of the normalized update (comparable across nodes with different tau_i).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from drdfl_flwr.config import MethodOptions
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.payload import Incoming, Tensors, check_payload
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import (
    Arrays,
    Contribution,
    ReductionError,
    check_float_keys,
    float_array,
    majority,
    total_examples,
    weighted_mean,
)

# payload key prefixes, read by the learner and the reducer below: the normalized update
# d_i, the first round's start point, entries averaged as in FedAvg, and the aggregate
UPDATE, START, MEAN, MODEL = "update.", "start.", "mean.", "model."
NORM_METRIC = "fednova_a"  # reply metric: ||a_i||_1


@dataclass(frozen=True)
class FedNovaOptions(MethodOptions):
    """Section ``[fednova]``: the local SGD's learning rate and momentum."""

    SECTION: ClassVar[str] = "fednova"
    lr: float = 0.01
    momentum: float = 0.9

    def __post_init__(self) -> None:
        self.check_positive("lr")
        self.check_non_negative("momentum")
        if not self.momentum < 1.0:
            self.fail("momentum", "must be < 1 (||a||_1 diverges at 1)")


def normalizing_norm(steps: int, momentum: float) -> float:
    """||a||_1 of ``steps`` SGD steps with heavy-ball ``momentum`` from a zero buffer:
    the sum over steps of every gradient's total coefficient in the cumulative change."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


class NovaState(nn.Module):
    """The node's FedNova bookkeeping, as buffers so that it round-trips through
    ``context.state``: the last round's ||a||_1 and how many aggregates arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a_norm", torch.zeros((), dtype=torch.float64))
        self.register_buffer("aggregates", torch.zeros((), dtype=torch.long))


class FedNovaLearner(Learner):
    """``classifier``: the model trained this round (x_i); ``global_model``: x^t."""

    OPTIONS = FedNovaOptions

    def setup(self) -> None:
        with self.common_init():  # the same x^0 on every node
            self.classifier = self.new_classifier()
        self.global_model = self.new_classifier()
        self.global_model.load_state_dict(self.classifier.state_dict())
        self.global_model.requires_grad_(False)
        self.nova = NovaState()

    # -- which entries travel how --------------------------------------------------------
    def stepped_names(self) -> list[str]:
        """Entries optimized by SGD: normalized updates."""
        return [k for k, _ in self.classifier.named_parameters()]

    def averaged_names(self) -> list[str]:
        """Floating-point entries SGD does not optimize (running statistics)."""
        stepped = set(self.stepped_names())
        return [
            k
            for k, v in self.classifier.state_dict().items()
            if v.is_floating_point() and k not in stepped
        ]

    def shared_payload(self) -> Tensors:
        a = float(self.nova.a_norm)
        now = self.classifier.state_dict()
        start = self.global_model.state_dict()
        out: Tensors = {}
        for k in self.stepped_names():
            delta = (start[k] - now[k]).detach().cpu()
            out[UPDATE + k] = delta / a if a > 0 else torch.zeros_like(delta)
        for k in self.averaged_names():
            out[MEAN + k] = now[k].detach().cpu().clone()
        if int(self.nova.aggregates) == 0:
            for k in self.stepped_names():
                out[START + k] = start[k].detach().cpu().clone()
        return out

    def expected_aggregate(self) -> Tensors:
        state = self.global_model.state_dict()
        return {MODEL + k: state[k] for k in [*self.stepped_names(), *self.averaged_names()]}

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Load x^{t+1} (``model.<k>``) from the hub; a peer's payload is refused."""
        if not incoming:
            return
        expected = self.expected_aggregate()
        for item in incoming:
            check_payload(item.tensors, expected)
        aggregate = incoming[-1].tensors
        with torch.no_grad():
            for model in (self.global_model, self.classifier):
                state = model.state_dict()
                for key, ref in expected.items():
                    name = key.removeprefix(MODEL)
                    state[name].copy_(aggregate[key].to(ref.device, ref.dtype))
        self.nova.aggregates += 1

    def train_round(self, data: ClientData) -> dict[str, float]:
        """tau_i SGD steps with momentum from x^t (momentum buffer reset)."""
        self.classifier.load_state_dict(self.global_model.state_dict())
        optimizer = torch.optim.SGD(
            self.classifier.parameters(), lr=self.opts.lr, momentum=self.opts.momentum
        )
        loss, steps = self.supervised_epochs(
            self.classifier, optimizer, data, self.round_generator()
        )
        a = normalizing_norm(steps, self.opts.momentum)
        self.nova.a_norm.fill_(a)
        with torch.no_grad():
            now = dict(self.classifier.named_parameters())
            start = self.global_model.state_dict()
            moved = sum(float((start[k] - p).pow(2).sum()) for k, p in now.items()) ** 0.5
        return {
            "l_ce": loss,
            "local_steps": float(steps),
            NORM_METRIC: a,
            "health_update_norm": moved / a if a > 0 else 0.0,
        }


def fednova_reduce(contributions: Sequence[Contribution], previous: Arrays | None) -> Arrays:
    """FedNova's server (Wang et al. 2020; JYWa/FedNova): x <- x - tau_eff * sum_i p_i d_i
    with d_i = (x - x_i) / ||a_i||_1, p_i = n_i / n, tau_eff = sum_i p_i ||a_i||_1.

    Contributions carry ``update.<k>`` = d_i (already normalized by the node, which knows
    its own steps and momentum) and the metric ``fednova_a``; the global model
    ``model.<k>`` is the previous aggregate, or, in the first round, the common start point
    the nodes send as ``start.<k>`` (every sender's must be the same: the normalized update
    is only meaningful from one shared x). Entries that SGD does not optimize (BatchNorm's
    running statistics) come as ``mean.<k>`` and are averaged by examples as in FedAvg:
    step normalization applies to gradient steps only (JYWa/FedNova normalizes the
    optimizer's parameters), and rescaling a running variance by tau_eff / a_i can
    drive it negative.
    """
    total = total_examples(contributions)
    norms = []
    for c in contributions:
        a = c.metrics.get(NORM_METRIC)
        if a is None or not (a > 0 and math.isfinite(a)):
            raise ReductionError(
                f"partition {c.partition_id} sent no finite positive '{NORM_METRIC}'",
                c.partition_id,
            )
        norms.append(float(a))
    weights = [c.examples / total for c in contributions]
    tau_eff = sum(p * a for p, a in zip(weights, norms, strict=True))
    stepped_keys = check_float_keys(contributions, lambda k: k.startswith(UPDATE))
    mean_keys = check_float_keys(contributions, lambda k: k.startswith(MEAN))
    updates = {k.removeprefix(UPDATE): k for k in sorted(stepped_keys)}
    means = {k.removeprefix(MEAN): k for k in sorted(mean_keys)}
    if not updates:
        raise ReductionError(f"FedNova replies carry no '{UPDATE}*' entries")
    if set(updates) & set(means):
        raise ReductionError(
            f"entries both stepped and averaged: {sorted(set(updates) & set(means))[:5]}"
        )
    if previous:
        base = {k.removeprefix(MODEL): v for k, v in previous.items() if k.startswith(MODEL)}
        if set(base) != set(updates) | set(means):
            raise ReductionError(
                "update keys differ from the model's: "
                f"{sorted(set(base) ^ (set(updates) | set(means)))[:5]}"
            )
    else:
        base = _common_start(contributions, updates)
    out: Arrays = {}
    for name, key in updates.items():
        for c in contributions:
            if c.arrays[key].shape != base[name].shape:
                raise ReductionError(
                    f"'{key}' from partition {c.partition_id} has shape "
                    f"{c.arrays[key].shape}, the model's is {base[name].shape}",
                    c.partition_id,
                )
        step = sum(p * c.arrays[key] for p, c in zip(weights, contributions, strict=True))
        out[MODEL + name] = (base[name] - tau_eff * step).astype(base[name].dtype)
    if means:
        subset = [
            Contribution(c.partition_id, {k: c.arrays[k] for k in means.values()}, c.metrics)
            for c in contributions
        ]
        averaged = weighted_mean(subset)
        for name, key in means.items():
            out[MODEL + name] = averaged[key]
    return out


def _common_start(contributions: Sequence[Contribution], updates: dict[str, str]) -> Arrays:
    """The first round's global model: the start point every sender sent, which must be
    one and the same."""
    starts = [c for c in contributions if any(k.startswith(START) for k in c.arrays)]
    if not starts:
        raise ReductionError("first FedNova round: no node sent its start point")

    def start_of(c: Contribution) -> bytes:
        return b"".join(float_array(c, START + name).tobytes() for name in updates)

    common = majority([(c.partition_id, start_of(c)) for c in starts])
    for c in starts:
        if start_of(c) != common:
            raise ReductionError(
                f"partition {c.partition_id} started from another model than the others "
                f"('{START}*' differs): FedNova's normalized updates need one common start "
                "point",
                c.partition_id,
            )
    reference = next(c for c in starts if start_of(c) == common)
    return {name: float_array(reference, START + name) for name in updates}


SPEC = MethodSpec(
    name="fednova",
    title="FedNova",
    sends="its step-normalized update + the norm (hub: FedNova's normalized average)",
    keeps="nothing: one global model",
    personalized="none (one global model)",
    learner=FedNovaLearner,
    reducer=fednova_reduce,
    exempt={"private": "one global model: nothing stays on the node"},
)
