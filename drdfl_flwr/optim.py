"""The generic optimizer and its learning-rate schedule, built from the run config.

Every method that trains with the project's generic optimizer builds it here
(:meth:`drdfl_flwr.learner.Learner.new_optimizer`): ``optimizer`` (``adam``, ``adamw``,
``sgd`` with ``momentum``), ``weight-decay``, at ``learning-rate`` (or a method's own
multiple of it, per parameter group). The defaults (Adam, no weight decay, a constant
rate) build exactly the ``torch.optim.Adam(params, lr=learning-rate)`` every such method
built before these keys existed. A method whose paper prescribes its own optimizer keeps
it (DSLTH's and FedNova's SGD, DRDFL-VF's head calibration): none of these keys reach it.

The schedule steps once per local round: the rate of a node's round r (its
``rounds_trained`` before the round, 0 first) is the base rate times
:func:`lr_factor`, set on every generic optimizer before the round trains
(:meth:`~drdfl_flwr.learner.Learner.fit`). It is a function of ``rounds_trained`` alone,
which the learner's state keeps, so a node restored from its state (a restart, another
process) continues its schedule where it stopped; the rate itself also travels in the
optimizer's state. ``cosine`` anneals over ``num-server-rounds`` from the base rate to
``lr-min-factor`` of it; ``step`` multiplies the rate by ``lr-step-factor`` every
``lr-step-rounds`` rounds. A node that trains fewer rounds than the server runs (it
joined late, or sat out under ``participation``) is at its own round of the schedule, as
DisPFL's pruning schedule counts the node's own rounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from drdfl_flwr.config import RunConfig

BASE_LRS = "drdfl_base_lrs"  # attribute of a generic optimizer: its groups' base rates


def build_optimizer(
    cfg: RunConfig, params: Iterable[Any], lr: float | None = None
) -> torch.optim.Optimizer:
    """The run's optimizer over ``params`` (tensors, or parameter groups that may carry
    their own ``lr``) at ``lr`` (default ``learning-rate``), its groups' base rates kept
    for :func:`schedule`. The rate is the base rate until the first :func:`schedule`."""
    lr = cfg.learning_rate if lr is None else lr
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    setattr(optimizer, BASE_LRS, [group["lr"] for group in optimizer.param_groups])
    return optimizer


def lr_factor(cfg: RunConfig, round_index: int) -> float:
    """The schedule's multiple of the base rate for a node's round ``round_index`` (its
    rounds trained before it; 0 is the first)."""
    if cfg.lr_schedule == "step":
        return cfg.lr_step_factor ** (round_index // cfg.lr_step_rounds)
    if cfg.lr_schedule == "cosine":
        progress = min(round_index, cfg.num_server_rounds) / cfg.num_server_rounds
        floor = cfg.lr_min_factor
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, round_index: int) -> bool:
    """Set ``optimizer``'s rates for round ``round_index``; False (and nothing changed)
    for an optimizer not built by :func:`build_optimizer` (a paper's own)."""
    base = getattr(optimizer, BASE_LRS, None)
    if base is None:
        return False
    factor = lr_factor(cfg, round_index)
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr * factor
    return True
