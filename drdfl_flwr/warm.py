"""Learners kept alive between messages in one process, so that a node's next message
does not rebuild its modules and optimizers and reload its state.

``context.state`` stays the truth. Every save gives the state a fresh token; a warm
learner is used only when its token is the one ``context.state`` holds now, so a message
that ran in another process, a restarted node or a node re-created by Flower loads from
``context.state`` exactly as before. A message takes its learner out of the cache and
only a successful save (or an evaluation that changed nothing) puts it back, so a
message that fails half-way never leaves a half-trained learner behind. The cache is
bounded by the size of the saved states (``warm-cache-mib``; 0 turns it off): least
recently used learners go first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

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

    def put(self, key: Hashable, token: str, learner: Learner, nbytes: int, budget: int) -> None:
        """Keep ``learner`` (whose saved state is ``nbytes`` long) within ``budget`` bytes."""
        self._entries.pop(key, None)
        if nbytes > budget:
            return
        self._entries[key] = (token, learner, nbytes)
        while sum(n for _, _, n in self._entries.values()) > budget:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


WARM = WarmLearners()  # one per process: a Ray actor, a SuperNode's ClientApp process
