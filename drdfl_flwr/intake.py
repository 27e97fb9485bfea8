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


OUTLIER_FACTOR = 3.0  # a distance this many times the median of accepted ones is refused
OUTLIER_HISTORY = 3  # accepted distances needed before the median is trusted
HISTORY_KEPT = 20


def relative_distance(received: Mapping, own: Mapping) -> float | None:
    """||received - own|| / ||own|| over the floating-point tensors both hold (None when
    there are none: bit-packed masks are not defended this way)."""
    num = den = 0.0
    for key, mine in own.items():
        theirs = received.get(key)
        if theirs is None or not mine.is_floating_point() or not theirs.is_floating_point():
            continue
        if theirs.shape != mine.shape:
            continue  # the learner's own checks name it
        num += (theirs.float() - mine.float()).pow(2).sum().item()
        den += mine.float().pow(2).sum().item()
    if den == 0.0:
        return None
    return (num / den) ** 0.5


def _trusted(learner: Learner, incoming: list[Incoming], intake: Intake) -> list[Incoming]:
    """The bounded-trust merge (``ring-defence = "outlier"``): a peer payload whose shared
    floats lie farther from the node's own than ``ring-defence-bound`` x their norm, or
    than 3 x the median distance of the payloads it accepted before, is refused before
    the learner sees it. A sign-flipped Learngene lies ~2 own norms away, a scaled one
    ~strength - 1, honest neighbours well under one."""
    own = learner.shared_payload()
    history = learner.accepted_distances
    kept = []
    for item in incoming:
        if item.from_hub:
            kept.append(item)
            continue
        distance = relative_distance(item.tensors, own)
        if distance is None:
            kept.append(item)
            continue
        bound = learner.cfg.ring_defence_bound
        if len(history) >= OUTLIER_HISTORY:
            bound = min(bound, OUTLIER_FACTOR * sorted(history)[len(history) // 2])
        if distance > bound:
            intake.rejections[sender_name(item)] = (
                f"outlier: its shared tensors lie {distance:.3g} of this node's own norm "
                f"from them (bound {bound:.3g}; ring-defence = outlier)"
            )
            continue
        kept.append(item)
        history.append(distance)
    del history[:-HISTORY_KEPT]
    return kept


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
    if learner.cfg.ring_defence == "outlier":
        incoming = _trusted(learner, incoming, intake)
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
