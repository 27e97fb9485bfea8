"""Learners kept alive between messages in one process, so that a node's next message
does not rebuild its modules and optimizers and reload its state.

``context.state`` stays the truth. Every save gives the state a fresh token; a warm
learner is used only when its token is the one ``context.state`` holds now, so a message
that ran in another process, a restarted node or a node re-created by Flower loads from
``context.state`` exactly as before. A message takes its learner out of the cache and
only a successful save (or an evaluation that changed nothing) puts it back, so a
message that fails half-way never leaves a half-trained learner behind. The cache is
bounded by what its learners hold in memory (``warm-cache-mib``; 0 turns it off): least
recently used learners go first. Memory, not the saved state's size: a DSLTH learner
saves its scores but holds its fixed random weights and gradients too (measured at 1,000
clients: bounded by saved bytes, each ClientApp actor held 4.4 GiB).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch
from torch import nn

from drdfl_flwr.learner import Learner


class WarmLearners:
    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, tuple[str, Learner, int]] = OrderedDict()

    def take(self, key: Hashable, token: str | None) -> Learner | None:
        """The warm learner for ``key`` if it holds the state ``token`` names (removed from
        the cache: the caller owns it until it is put back)."""
        entry = self._entries.pop(key, None)
        if entry is None or token is None or entry[0] != token:
            return None
        learner = entry[1]
        for module in learner.modules().values():  # as freshly built: training mode
            if isinstance(module, nn.Module):
                module.train()
        return learner

    def put(self, key: Hashable, token: str, learner: Learner, budget: int) -> None:
        """Keep ``learner`` within ``budget`` bytes of learners in memory."""
        self._entries.pop(key, None)
        nbytes = resident_bytes(learner)
        if nbytes > budget:
            return
        self._entries[key] = (token, learner, nbytes)
        while sum(n for _, _, n in self._entries.values()) > budget:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def resident_bytes(learner: Learner) -> int:
    """Bytes of the tensors ``learner`` keeps alive: its modules' parameters, their
    gradients and buffers, and its optimizers' state (each storage counted once)."""
    storages: dict[int, int] = {}

    def add(tensor: torch.Tensor | None) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for part in learner.modules().values():
        if isinstance(part, nn.Module):
            for parameter in part.parameters():
                add(parameter)
                add(parameter.grad)
            for buffer in part.buffers():
                add(buffer)
        elif isinstance(part, torch.optim.Optimizer):
            for state in part.state.values():
                for value in state.values():
                    add(value)
    return sum(storages.values())


WARM = WarmLearners()  # one per process: a Ray actor, a SuperNode's ClientApp process
