"""The one interface every method implements.

A learner knows nothing about Flower: the ClientApp feeds it what arrived (peers'
payloads or the hub's aggregate, each saying who sent it and with what weight) and the
node's data, asks for its metrics and its outgoing payload, and keeps its private state
in ``context.state`` between rounds. That keeps methods testable as plain PyTorch and
lets the relay and the hub route and reduce payloads without knowing what is in them.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from drdfl_flwr.config import ConfigError, MethodOptions, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.optim import build_optimizer, schedule
from drdfl_flwr.payload import Incoming, PayloadError, Tensors
from drdfl_flwr.scoring import score_logits


def derived_seed(*parts: object) -> int:
    """A 63-bit torch seed named by ``parts`` (``("common", seed, "model")``,
    ``("private", seed, partition)``): independent streams for every name, so a node's
    private modules can never be drawn from the same seed as the modules every node shares
    (with ``seed * 7919 + partition`` and ``seed`` they were, for partition 0 of seed 0)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Learner(ABC):
    """A method's local side. Subclasses build their modules and optimizers in
    :meth:`setup` and train one round in :meth:`train_round`; every module or optimizer
    attribute is the node's private state. ``OPTIONS`` is the method's config section
    class and ``self.opts`` its validated values (``None`` for a method without one).
    The base owns what every method needs alike: the round's seed, counting rounds
    (:meth:`fit`), the origin check of what arrives (:meth:`receive`), and a default
    :meth:`predict` (the node's ``classifier``).

    Whatever a method averages, exchanges or replaces is built inside
    :meth:`common_init`, so it starts bit-identical on every node (as Flower's FedAvg sends
    its initial arrays): a first average of unrelated random networks is a worse start
    than any node's own. Private modules are drawn from the node's own stream."""

    # payload key prefixes that differ between freshly built nodes by design (a node's
    # own sparse mask): excluded from :meth:`common_start`
    NODE_SPECIFIC: ClassVar[tuple[str, ...]] = ()
    # the modules that never leave the node, by attribute name (DRDFL's ``persona``):
    # what :meth:`private_state` holds unless a method says more
    PRIVATE: ClassVar[tuple[str, ...]] = ()
    OPTIONS: ClassVar[type[MethodOptions] | None] = None

    def __init__(
        self,
        cfg: RunConfig,
        input_shape: tuple[int, int, int],
        num_classes: int,
        partition_id: int = 0,
        centralized: bool = False,
    ):
        """``centralized``: the method's spec names a hub reducer, so the node takes only
        the hub's aggregate (:meth:`check_origin`); ``registry.build_learner`` sets it."""
        self.cfg = cfg
        self.partition_id = partition_id
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.centralized = centralized
        self.device = resolve_device(cfg.device)
        self.opts = cfg.options(self.OPTIONS) if self.OPTIONS is not None else None
        self.rounds_trained = 0
        # the last server round this node trained in, and what it reported then: a round
        # asked for again is answered from this record, never trained twice (node_round)
        self.last_round = 0
        self.last_metrics: dict[str, float] = {}
        # relative distances of the peer payloads the ring defence accepted (intake.py)
        self.accepted_distances: list[float] = []
        # attack = "stale": the payload of the attacker's first round, sent ever after
        self.stale_payload: dict[str, torch.Tensor] | None = None
        self.examples_drawn = 0  # local training examples drawn (see measured_fit)
        self.setup()

    @abstractmethod
    def setup(self) -> None:
        """Build the method's modules and optimizers from ``self.cfg`` and the data shape."""

    @contextmanager
    def common_init(self, part: str = "model") -> Iterator[None]:
        """Draw the modules built inside from the run's common stream named ``part``
        (identical on every node, whatever its partition), then give the node its own
        stream back untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed("common", self.cfg.seed, part))
            yield

    def common_start(self) -> Tensors:
        """What every freshly built node of a run holds alike: the payload less the
        :attr:`NODE_SPECIFIC` entries (tests/test_method_contract.py checks it for every
        registered method)."""
        return {
            k: v for k, v in self.shared_payload().items() if not k.startswith(self.NODE_SPECIFIC)
        }

    def private_state(self) -> Tensors:
        """What never leaves the node, by name (attribute, then the module's state-dict
        key: ``persona.net.0.weight``): the modules named in :attr:`PRIVATE`.
        tests/test_method_contract.py checks, for every registered method, that no payload
        carries any of it, by key or by value."""
        return {
            f"{name}.{key}": value
            for name in self.PRIVATE
            for key, value in getattr(self, name).state_dict().items()
        }

    @abstractmethod
    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Merge what arrived (peers' payloads or the hub's aggregate). Validate everything
        before changing anything, and raise :class:`~drdfl_flwr.payload.PayloadError`."""

    def receive(self, incoming: Sequence[Incoming], server_round: int) -> None:
        """Take in what arrived in round ``server_round``: a node that has never trained
        and receives in a ring that has (a late joiner, or a node whose state is gone)
        joins it (:meth:`join`); every other node absorbs. The one place that decides,
        after the origin check (nothing from the wrong side reaches a method)."""
        self.check_origin(incoming)
        if self.rounds_trained == 0 and server_round > 1:
            self.join(incoming)
        else:
            self.absorb(incoming)

    def join(self, incoming: Sequence[Incoming]) -> None:
        """A fresh node's first intake in a running ring. The same as :meth:`absorb` unless
        a method's paper says how a newcomer starts (DRDFL: Algorithm 2). Validates before
        it changes anything, like absorb."""
        self.absorb(incoming)

    def check_origin(self, incoming: Sequence[Incoming]) -> None:
        """Refuse what came from the wrong side, before anything changes: a centralized
        method (its spec names a reducer) takes only the hub's aggregate, a decentralized
        one only its peers' payloads."""
        centralized = self.centralized
        for item in incoming:
            if item.from_hub == centralized:
                continue
            if centralized:
                raise PayloadError(
                    f"{self.cfg.method} takes only the hub's aggregate, got a payload from "
                    f"peer {item.sender}"
                )
            raise PayloadError(
                f"{self.cfg.method} is decentralized: it takes peers' payloads, not the "
                "hub's aggregate"
            )

    def fit(self, data: ClientData) -> dict[str, float]:
        """One round of local training (:meth:`train_round`) at the round's learning rates
        (``lr-schedule``), counted, then the method's health read on the trained state
        (:meth:`health`)."""
        self.schedule_learning_rates()
        metrics = self.train_round(data)
        self.rounds_trained += 1
        metrics.update(self.health(data))
        return metrics

    @abstractmethod
    def train_round(self, data: ClientData) -> dict[str, float]:
        """The method's local training for one round; returns its mean training losses
        and whatever else it measures while training. ``rounds_trained`` still counts the
        rounds before this one (:attr:`round_seed`)."""

    def health(self, data: ClientData) -> dict[str, float]:
        """Metrics that say whether the method's mechanism works (``health_*``, alarms),
        measured after the round is counted. None by default."""
        return {}

    @abstractmethod
    def shared_payload(self) -> Tensors:
        """What this node sends its out-neighbours (empty for methods that share nothing)."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of the personalized model: the node's ``classifier`` by default."""
        self.classifier.eval()
        return self.classifier(x)

    def new_classifier(self) -> nn.Module:
        """The run's classifier (``classifier``, ``classifier-norm``) on this node's device."""
        from drdfl_flwr.models import build_classifier

        return build_classifier(
            self.cfg.classifier, self.input_shape, self.num_classes, self.cfg.classifier_norm
        ).to(self.device)

    def new_optimizer(
        self, params: Iterable[Any], lr: float | None = None
    ) -> torch.optim.Optimizer:
        """The run's generic optimizer (``optimizer``, ``momentum``, ``weight-decay``) over
        ``params`` at ``lr`` (default ``learning-rate``; parameter groups may carry their
        own), at this round's point of ``lr-schedule`` (:mod:`drdfl_flwr.optim`). Kept as an
        attribute, it is rescheduled before every round; built inside a round, it starts
        at that round's rate."""
        optimizer = build_optimizer(self.cfg, params, lr)
        schedule(optimizer, self.cfg, self.rounds_trained)
        return optimizer

    def schedule_learning_rates(self) -> None:
        """Every generic optimizer the learner keeps at the rate of the round about to be
        trained (``rounds_trained`` rounds done); a paper's own optimizer is left alone."""
        for obj in self.modules().values():
            if isinstance(obj, torch.optim.Optimizer):
                schedule(obj, self.cfg, self.rounds_trained)

    def modules(self) -> dict[str, nn.Module | torch.optim.Optimizer]:
        """Every stateful attribute (modules and optimizers) by name: the private state."""
        return {
            name: value
            for name, value in vars(self).items()
            if isinstance(value, (nn.Module, torch.optim.Optimizer))
        }

    def state_dict(self) -> dict:
        state = {name: obj.state_dict() for name, obj in self.modules().items()}
        state["rounds_trained"] = self.rounds_trained
        state["last_round"] = self.last_round
        state["last_metrics"] = dict(self.last_metrics)
        state["accepted_distances"] = list(self.accepted_distances)
        state["stale_payload"] = self.stale_payload
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rounds_trained = int(state.pop("rounds_trained", 0))
        self.last_round = int(state.pop("last_round", 0))
        self.last_metrics = dict(state.pop("last_metrics", {}))
        self.accepted_distances = list(state.pop("accepted_distances", []))
        self.stale_payload = state.pop("stale_payload", None)
        for name, obj in self.modules().items():
            obj.load_state_dict(state[name])

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_bytes(self, blob: bytes) -> None:
        self.load_state_dict(torch.load(io.BytesIO(blob), map_location=self.device))

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """:meth:`predict` over ``x`` in batches, on the CPU. Batches of 128: measured
        1.3 s against 1.8 s for 512 on 2,000 CIFAR images with the small CNN on one CPU
        thread (the larger batch spills caches)."""
        if len(x) == 0:
            return torch.empty(0, self.num_classes)
        return torch.cat(
            [self.predict(xb.to(self.device)).float().cpu() for xb in x.split(batch_size)]
        )

    def accuracy(
        self, x: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor | None = None
    ) -> float:
        """Top-1 accuracy of :meth:`predict`, with ``log_prior`` added to the logits when
        given (logit adjustment: a class-balanced classifier scored on a skewed set)."""
        if len(y) == 0:
            return float("nan")
        logits = self.logits(x)
        if log_prior is not None:
            logits = logits + log_prior.to(logits.dtype)
        return (logits.argmax(1) == y).double().mean().item()

    def local_log_prior(self, data: ClientData) -> torch.Tensor | None:
        """What the method adds to its logits on the node's own (skewed) test data; none
        by default (DFML: its class prior, see there)."""
        return None

    def evaluate(self, data: ClientData) -> dict[str, float]:
        """The paper's Local-T and Global-T of this node's personalized model, and the
        full-test-set readings beside them (:mod:`drdfl_flwr.scoring`)."""
        return score_logits(
            self.logits(data.x_local_test),
            data.y_local_test,
            self.logits(data.x_global_test),
            data.y_global_test,
            data.own_labels,
            self.num_classes,
            self.local_log_prior(data),
        )

    def batches(
        self, data: ClientData, generator: torch.Generator, epochs: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled mini-batches for ``epochs`` (default ``local-epochs``) epochs, on the device."""
        n = len(data.y_train)
        for _ in range(self.cfg.local_epochs if epochs is None else epochs):
            order = torch.randperm(n, generator=generator)
            for idx in order.split(self.cfg.batch_size):
                self.examples_drawn += len(idx)
                yield data.x_train[idx].to(self.device), data.y_train[idx].to(self.device)

    def supervised_epochs(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ClientData,
        generator: torch.Generator,
        epochs: int | None = None,
        after_step: Callable[[], None] | None = None,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[float, int]:
        """Cross-entropy training of ``model`` with ``optimizer`` (which decides what
        moves); returns (mean loss, optimizer steps). ``penalty()`` is added to every
        batch's loss (FedProx's proximal term); ``after_step`` runs after every step (a
        sparse method re-applies its mask there)."""
        model.train()
        total, steps = 0.0, 0
        for x, y in self.batches(data, generator, epochs):
            loss = F.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.item()
            steps += 1
        return total / max(steps, 1), steps

    @property
    def round_seed(self) -> int:
        """One seed per (run seed, node, round): the round's data order and, set as torch's
        global seed before training, its noise draws, so runs repeat exactly on the same
        hardware whichever process serves the node."""
        return self.cfg.seed * 1_000_003 + self.partition_id * 10_007 + self.rounds_trained

    def round_generator(self) -> torch.Generator:
        """A generator seeded with :attr:`round_seed` (the round's shuffles)."""
        gen = torch.Generator()
        gen.manual_seed(self.round_seed)
        return gen


class LossMeans:
    """Per-step losses summed over a round and read as means over its steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def measured_fit(learner: Learner, data: ClientData) -> dict[str, float]:
    """``learner.fit(data)`` with its compute counted, for the tables' compute parity:
    ``local_passes`` (local training examples drawn, over the training-set size: FedRep's
    head and body phases make two, Local one) and ``optimizer_steps`` (every optimizer's
    steps, including those a method builds inside ``fit``). The one way every round is
    trained (ClientApp, in-process ring, benchmarks)."""
    steps = [0]

    def count(optimizer, args, kwargs) -> None:
        steps[0] += 1

    learner.examples_drawn = 0
    handle = register_optimizer_step_post_hook(count)
    try:
        metrics = learner.fit(data)
    finally:
        handle.remove()
    metrics["local_passes"] = learner.examples_drawn / max(len(data.y_train), 1)
    metrics["optimizer_steps"] = float(steps[0])
    return metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this node")
    return torch.device(name)
