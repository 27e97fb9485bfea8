"""A node's intake: decode and validate what its neighbours sent, absorb what passes.

Everything a node receives comes from outside its trust boundary (a buggy or hostile
neighbour, a corrupted transfer). The rules: nothing is applied before all of it is
decoded and validated (``Learner.absorb`` and ``join`` validate before they change anything); a bad
payload costs only itself, with a reason naming the sender and the key; the node trains
on whatever happens; and a bad input never crashes the node.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from drdfl_flwr.learner import Learner
from drdfl_flwr.payload import AGGREGATE, Incoming, PayloadError

# Exceptions a method's absorb may raise on input its checks did not foresee (a tensor
# operation on a strange value); they count as a rejection of that input, not a crash.
INPUT_ERRORS = (PayloadError, ValueError, TypeError, RuntimeError, KeyError, IndexError)


@dataclass
class Intake:
    accepted: list[Incoming] = field(default_factory=list)
    rejections: dict[str, str] = field(default_factory=dict)  # sender name -> reason


def sender_name(item: Incoming) -> str:
    return AGGREGATE if item.from_hub else str(item.sender)


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, PayloadError) else f"{type(err).__name__}: {err}"


def take_in(
    learner: Learner,
    incoming: Sequence[Incoming],
    server_round: int,
    undecodable: Mapping[str, str] | None = None,
) -> Intake:
    """Absorb every received payload that passes the learner's checks; ``undecodable``
    (sender name -> reason) are those that did not even decode, already refused.

    With several senders and a refusal, each is tried alone on a copy of the learner to
    find which one is bad, and the others are absorbed together, as they would have been.
    ``server_round`` lets a fresh node tell joining a running ring from starting one
    (:meth:`Learner.receive`).
    """
    incoming = list(incoming)
    intake = Intake(rejections=dict(undecodable or {}))
    if not incoming:
        return intake
    try:
        learner.receive(incoming, server_round)
        intake.accepted = incoming
        return intake
    except INPUT_ERRORS as err:
        if len(incoming) == 1:
            intake.rejections[sender_name(incoming[0])] = _reason(err)
            return intake
    good = []
    for item in incoming:
        try:
            copy.deepcopy(learner).receive([item], server_round)
            good.append(item)
        except INPUT_ERRORS as err:
            intake.rejections[sender_name(item)] = _reason(err)
    if good:
        try:
            learner.receive(good, server_round)
            intake.accepted = good
        except INPUT_ERRORS as err:  # fine alone, refused together: refuse them all
            intake.rejections.update({sender_name(i): _reason(err) for i in good})
    return intake
