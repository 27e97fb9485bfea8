"""The oracle ceiling (a diagnostic, not a method; run config ``oracle-absent-per-class``):
each node also trains on real images of the classes it lacks, drawn from the other
nodes' training data. What a method could at best gain on the classes a node never saw,
if the ring could hand it real examples of them: when even this barely moves balanced
Global-T and the absent-class accuracy in a setting, no sharing scheme can show a gain
there, and the setting's budget is what must change first.

The extra images change what the node trains on, never what it is scored against: its
class prior (scoring's p_k, the classes it lacks, the majority floor) stays its own
partition's (:attr:`drdfl_flwr.data.ClientData.own_labels`). The node draws
``per_class`` images of every class it lacks (or all the others hold, if fewer), so a
round runs more optimizer steps than without the oracle: same rounds and epochs, more data.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from drdfl_flwr.data import ClientData


def with_absent_classes(
    data: ClientData,
    pool_x: torch.Tensor,
    pool_y: torch.Tensor,
    per_class: int,
    seed: tuple[int, int],
) -> ClientData:
    """``data`` with up to ``per_class`` images (seeded draw without replacement) of
    every class it holds none of, from the pool (the other nodes' training images)."""
    held = torch.bincount(data.y_train, minlength=data.num_classes) > 0
    rng = np.random.default_rng(list(seed))
    picks = []
    for k in torch.nonzero(~held).flatten().tolist():
        candidates = torch.nonzero(pool_y == k).flatten().numpy()
        take = min(per_class, len(candidates))
        picks.append(rng.choice(candidates, size=take, replace=False))
    chosen = torch.from_numpy(np.sort(np.concatenate(picks))) if picks else torch.tensor([])
    chosen = chosen.long()
    return dataclasses.replace(
        data,
        x_train=torch.cat([data.x_train, pool_x[chosen]]),
        y_train=torch.cat([data.y_train, pool_y[chosen]]),
        y_own=data.y_train,
    )
