"""What the classifier-only baselines share: one classifier, a rule for which of its
state entries leave the node, and the hub-side merge (load the aggregate).

A baseline file then holds only its maths: FedAvg shares everything, FedBN everything but
BatchNorm, FedRep and DFedPGP everything but the head, each with its own training order.
Only floating-point entries are ever shared (BatchNorm's ``num_batches_tracked`` counter
is not a parameter and is never averaged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.payload import Incoming, Tensors, check_payload


def head_names(model: nn.Module) -> set[str]:
    """State-entry names of the model's last linear layer: the personal head of FedRep and
    DFedPGP (DFedPGP's code: the parameters named ``linear``)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear layer to use as the head")
    return {f"{last}.{k}" for k in dict(model.get_submodule(last).state_dict())}


def norm_names(model: nn.Module) -> set[str]:
    """State-entry names of every BatchNorm layer (scale, shift, running statistics)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            names.update(f"{module_name}.{k}" for k in module.state_dict())
    return names


class ClassifierLearner(Learner):
    """One classifier trained with cross-entropy; ``private_names()`` never leave the node."""

    def setup(self) -> None:
        with self.common_init():
            self.classifier = self.new_classifier()
        self.optimizer = self.new_optimizer(self.classifier.parameters())

    def private_names(self) -> set[str]:
        """State entries that stay on the node (none for FedAvg)."""
        return set()

    def private_state(self) -> Tensors:
        """The classifier's :meth:`private_names` entries (and any module in ``PRIVATE``)."""
        private = self.private_names()
        state = self.classifier.state_dict()
        return {
            **super().private_state(),
            **{f"classifier.{k}": v for k, v in state.items() if k in private},
        }

    def shared_names(self) -> list[str]:
        private = self.private_names()
        return [
            k
            for k, v in self.classifier.state_dict().items()
            if v.is_floating_point() and k not in private
        ]

    def shared_payload(self) -> Tensors:
        state = self.classifier.state_dict()
        return {k: state[k].detach().cpu().clone() for k in self.shared_names()}

    def load_shared(self, tensors: Tensors) -> None:
        """Overwrite the shared entries (validated already); private ones are untouched."""
        state = self.classifier.state_dict()
        for key, value in tensors.items():
            state[key].copy_(value.to(state[key].device, state[key].dtype))

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        """Centralized: load the hub's aggregate; a peer's payload is refused."""
        if not incoming:
            return
        expected = self.shared_payload()
        for item in incoming:
            check_payload(item.tensors, expected)
        self.load_shared(incoming[-1].tensors)

    def train_only(
        self,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        data: ClientData,
        generator: torch.Generator,
        epochs: int,
        model: nn.Module | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> tuple[float, int]:
        """``epochs`` epochs in which only ``params`` move (FedRep's and DFedPGP's head and
        body phases): every other classifier parameter has ``requires_grad`` off for the
        phase, so no gradient is even computed for it, and ``optimizer`` holds ``params``.
        ``model`` wraps the classifier when a phase needs another forward (norm layers
        in eval mode)."""
        moving = {id(p) for p in params}
        frozen = [
            p for p in self.classifier.parameters() if id(p) not in moving and p.requires_grad
        ]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return self.supervised_epochs(
                model or self.classifier, optimizer, data, generator, epochs, after_step=after_step
            )
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def train_round(self, data: ClientData) -> dict[str, float]:
        loss, steps = self.supervised_epochs(
            self.classifier, self.optimizer, data, self.round_generator()
        )
        return {"l_ce": loss, "local_steps": float(steps)}


class HeadBodyLearner(ClassifierLearner):
    """The classifier split into a personal head (its last linear layer) and a body, each
    with its own Adam, so that a phase can train one part alone (FedRep, DFedPGP)."""

    def setup(self) -> None:
        with self.common_init():  # the head too: one common model, as FedAvg's
            self.classifier = self.new_classifier()
        head = self.head_parameter_names()
        named = dict(self.classifier.named_parameters())
        self.head_params = [p for n, p in named.items() if n in head]
        self.body_params = [p for n, p in named.items() if n not in head]
        self.head_optimizer = self.new_optimizer(self.head_params)
        self.body_optimizer = self.new_optimizer(self.body_params)

    def private_names(self) -> set[str]:
        """The head never leaves the node."""
        return head_names(self.classifier)

    def head_parameter_names(self) -> set[str]:
        head = head_names(self.classifier)
        return {n for n, _ in self.classifier.named_parameters() if n in head}
