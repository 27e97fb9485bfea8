"""The one interface every method implements, and the registry that picks one by name.

A learner knows nothing about Flower: the ClientApp feeds it received payloads and the
node's data, asks for its metrics and its outgoing payload, and keeps its private state
in ``context.state`` between rounds. That keeps methods testable as plain PyTorch and
lets the relay route payloads without knowing what is in them.
"""

from __future__ import annotations

import importlib
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from drdfl_flwr.config import METHODS, ConfigError, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.payload import Tensors

# name -> "module:Class"; imported lazily so that one method's heavy imports or bugs
# cannot break the others.
LEARNERS: dict[str, str] = {
    "drdfl": "drdfl_flwr.methods.drdfl:DRDFLLearner",
    "local": "baselines.local:LocalLearner",
    "dfml": "drdfl_flwr.methods.dfml:DFMLLearner",
    "dslth": "drdfl_flwr.methods.dslth:DSLTHLearner",
}
assert set(LEARNERS) == set(METHODS), "config.METHODS and LEARNERS must list the same methods"


class Learner(ABC):
    """A method's local side. Subclasses build their modules and optimizers in
    :meth:`setup`; every such attribute is the node's private state."""

    def __init__(
        self,
        cfg: RunConfig,
        input_shape: tuple[int, int, int],
        num_classes: int,
        partition_id: int = 0,
    ):
        self.cfg = cfg
        self.partition_id = partition_id
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.device = resolve_device(cfg.device)
        self.rounds_trained = 0
        self.setup()

    @abstractmethod
    def setup(self) -> None:
        """Build the method's modules and optimizers from ``self.cfg`` and the data shape."""

    @abstractmethod
    def absorb(self, payloads: Sequence[Tensors]) -> None:
        """Merge what the in-neighbours sent. Validate everything before changing anything."""

    @abstractmethod
    def fit(self, data: ClientData) -> dict[str, float]:
        """One round of local training; returns mean training losses."""

    @abstractmethod
    def shared_payload(self) -> Tensors:
        """What this node sends its out-neighbours (empty for methods that share nothing)."""

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of the personalized model."""

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
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rounds_trained = int(state.pop("rounds_trained", 0))
        for name, obj in self.modules().items():
            obj.load_state_dict(state[name])

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_bytes(self, blob: bytes) -> None:
        self.load_state_dict(torch.load(io.BytesIO(blob), map_location=self.device))

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
        if len(y) == 0:
            return float("nan")
        correct = 0
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            correct += (self.predict(xb.to(self.device)).argmax(1).cpu() == yb).sum().item()
        return correct / len(y)

    def evaluate(self, data: ClientData) -> dict[str, float]:
        """The paper's two metrics for this node's personalized model."""
        return {
            "local_t_acc": self.accuracy(data.x_local_test, data.y_local_test),
            "global_t_acc": self.accuracy(data.x_global_test, data.y_global_test),
        }

    def batches(
        self, data: ClientData, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled mini-batches for ``local-epochs`` epochs, already on the device."""
        n = len(data.y_train)
        for _ in range(self.cfg.local_epochs):
            order = torch.randperm(n, generator=generator)
            for idx in order.split(self.cfg.batch_size):
                yield data.x_train[idx].to(self.device), data.y_train[idx].to(self.device)

    def round_generator(self) -> torch.Generator:
        """Seeded per (seed, node, round) so runs repeat exactly on the same hardware."""
        gen = torch.Generator()
        gen.manual_seed(
            self.cfg.seed * 1_000_003 + self.partition_id * 10_007 + self.rounds_trained
        )
        return gen


def build_learner(
    cfg: RunConfig, input_shape: tuple[int, int, int], num_classes: int, partition_id: int = 0
) -> Learner:
    """Instantiate the configured method with seeded initial weights."""
    try:
        target = LEARNERS[cfg.method]
    except KeyError:
        raise ConfigError("method", cfg.method, f"must be one of {', '.join(LEARNERS)}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    torch.manual_seed(cfg.seed * 7919 + partition_id)
    return cls(cfg, input_shape, num_classes, partition_id=partition_id)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this node")
    return torch.device(name)
