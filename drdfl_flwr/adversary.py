"""A hostile neighbour, for measuring what one costs and what a defence saves (off by
default: ``attack = "none"``). The attacks are well-formed: every payload keeps its keys,
shapes and dtypes, variances and counts stay positive, values stay inside the receivers'
magnitude bound, so the node-side checks of :mod:`drdfl_flwr.intake` let them through and
only a defence that looks at the values themselves can stop them.

- ``sign-flip``: every shared float negated (bit-packed masks: every bit inverted);
- ``scale``: every shared float multiplied by ``attack-strength``;
- ``noise``: every shared float replaced by Gaussian noise with the tensor's own spread;
- ``label-flip``: the node trains on labels k -> K - 1 - k and sends what that makes;
- ``stale``: the node sends its first round's payload in every later round (a replay:
  a free rider that trains for itself, or a captured old message sent again).

Tensors that must stay positive to be well-formed (names ending ``var`` or ``count``)
keep their magnitude under every attack, and integer identifiers (DFML's ``arch_id``) are
left as they are: only floats and bit-packed masks are attacked.
"""

from __future__ import annotations

import dataclasses

import torch

from drdfl_flwr.data import ClientData
from drdfl_flwr.payload import Tensors

POSITIVE = ("var", "count")  # payload names whose values must stay >= 0 to be well-formed


def attacking(cfg, partition_id: int) -> bool:
    return cfg.attack != "none" and partition_id in cfg.attackers()


def flipped_labels(data: ClientData) -> ClientData:
    """The node's data with every training label k replaced by K - 1 - k."""
    return dataclasses.replace(data, y_train=data.num_classes - 1 - data.y_train)


def replayed(learner, payload: Tensors) -> Tensors:
    """``stale``: the first payload the node made, kept in its state, sent every round."""
    if learner.stale_payload is None:
        learner.stale_payload = {k: v.detach().clone() for k, v in payload.items()}
    return {k: v.clone() for k, v in learner.stale_payload.items()}


def hostile_payload(payload: Tensors, attack: str, strength: float, seed: int) -> Tensors:
    """``payload`` as the ``attack`` would send it (a new dict; the node's own untouched)."""
    if attack in ("label-flip", "stale"):
        return payload  # the labels were the attack; the replay is the node's (node.py)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in payload.items():
        if value.dtype != torch.uint8 and not value.is_floating_point():
            out[key] = value.clone()  # identifiers and counters (DFML's arch_id) kept
            continue
        if not value.is_floating_point():  # bit-packed masks (DSLTH, DisPFL)
            if attack == "sign-flip":
                out[key] = torch.bitwise_not(value)
            elif attack == "noise":
                out[key] = torch.randint(0, 256, value.shape, generator=gen, dtype=torch.uint8)
            else:
                out[key] = value.clone()
            continue
        if attack == "sign-flip":
            hostile = -value
        elif attack == "scale":
            hostile = value * strength
        elif attack == "noise":
            spread = value.float().std() if value.numel() > 1 else value.float().abs()
            hostile = torch.randn(value.shape, generator=gen) * spread + value.float().mean()
        else:
            raise ValueError(f"unknown attack {attack!r}")
        if key.endswith(POSITIVE):
            hostile = hostile.abs()
        out[key] = hostile.to(value.dtype)
    return out
