"""The contract every registered method keeps, one suite over the registry: a method is
checked the moment it has its line in ``registry.METHODS`` and its word in
``conf/cpu-smoke.toml`` (the config it runs with here), and its own test file holds only
its mechanism.

The checks, by the name an exemption uses:

- ``state``: a node saved after any round and restored into a fresh learner sends what
  it would have sent, and trains the next round to the same metrics, payload and state
  (what ``context.state`` and a resumed run rely on);
- ``bad-payload``: a payload with a NaN, a misshapen, a missing or an unknown entry is
  refused with a :class:`~drdfl_flwr.payload.PayloadError` naming that entry, so is one
  from the wrong side (a peer's to a hub method, the hub's to a ring method), and the
  node is left exactly as it was; the good payload is then taken;
- ``private``: nothing the node keeps (:meth:`~drdfl_flwr.learner.Learner.private_state`)
  is in what it sends, neither by name nor by value, in any round;
- ``common-start``: whatever nodes share starts bit-identical on every node and is
  drawn from the run seed (:meth:`~drdfl_flwr.learner.Learner.common_start`);
- ``rerun``: the same seed gives the same payloads and metrics, bit for bit, whatever
  the process drew before.

A check that cannot hold for a method is declared on its spec
(``MethodSpec.exempt = {check: why}``) and runs as a strict expected failure: an
exemption that stops being needed fails the suite.

Two nodes play four rounds on tiny random 8x8 images (the smoke grid's digits shape),
each round through :func:`~drdfl_flwr.node.node_round` as every runner trains one: a ring
method's node takes in the other's last payload, a hub method's nodes the reduction of
both replies by the method's own reducer. BatchNorm is switched on wherever the method
allows it, so running statistics are in every check.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from drdfl_flwr import registry
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.learner import Learner
from drdfl_flwr.node import node_round
from drdfl_flwr.payload import PEER, Incoming, PayloadError, Tensors, from_hub
from strategies.reducers import EXAMPLES, Contribution
from tests.conftest import random_client_data
from tests.smoke_checks import SMOKE

CHECKS = ("state", "bad-payload", "private", "common-start", "rerun")
METHODS = list(registry.METHODS)
SHAPE, CLASSES, NODES, ROUNDS, EXAMPLES_PER_NODE = (1, 8, 8), 10, 2, 4, 48
UNKNOWN = "no-such-entry"


def contract(request: pytest.FixtureRequest, method: str, check: str) -> None:
    """Mark this test an expected failure if ``method``'s spec exempts it from ``check``."""
    reason = registry.method_spec(method).exempt.get(check)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=f"{method}: {reason}", strict=True))


def contract_config(method: str, **changes) -> RunConfig:
    """The method's first run in the smoke grid, with BatchNorm where the method takes it."""
    cfg = next(run.cfg for run in SMOKE.runs if run.cfg.method == method).replace(**changes)
    batch = cfg.replace(classifier_norm="batch")
    try:
        registry.check_run_config(batch)
    except ConfigError:
        return cfg
    return batch


def fresh(method: str, partition_id: int = 0, **changes) -> Learner:
    cfg = contract_config(method, **changes)
    return registry.build_learner(cfg, SHAPE, CLASSES, partition_id)


def node_data(partition_id: int) -> ClientData:
    return random_client_data(EXAMPLES_PER_NODE, SHAPE, CLASSES, seed=partition_id)


def flat(value, prefix: str = "") -> dict[str, object]:
    """A nested state (dicts, lists, tensors, numbers) as path -> leaf."""
    if isinstance(value, list | tuple):
        value = dict(enumerate(value))
    if isinstance(value, dict):
        return {
            path: leaf
            for key, item in value.items()
            for path, leaf in flat(item, f"{prefix}{key}/").items()
        }
    return {prefix: value}


def same_leaf(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        a, b = a.cpu(), b.cpu()
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def differences(a, b) -> list[str]:
    """The paths where two nested states (or payloads, or metrics) differ."""
    fa, fb = flat(a), flat(b)
    return sorted(set(fa) ^ set(fb)) + [k for k in fa if k in fb and not same_leaf(fa[k], fb[k])]


def saved_state(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob))


def restored(method: str, blob: bytes, partition_id: int = 0) -> Learner:
    torch.manual_seed(987)  # nothing may depend on the RNG a fresh learner was built under
    learner = fresh(method, partition_id)
    learner.load_bytes(blob)
    return learner


@dataclass
class Played:
    """Rounds of a two-node run, indexed [round - 1][node]."""

    incoming: list[list[list[Incoming]]]  # what the node took in at the round's start
    payloads: list[list[Tensors]]
    metrics: list[list[dict[str, float]]]
    states: list[list[bytes]]  # the node's saved state after the round
    private: list[list[Tensors]]  # its private state after the round


def play(method: str, rounds: int = ROUNDS) -> Played:
    cfg = contract_config(method)
    reducer = registry.hub_reducer(cfg)
    learners = [registry.build_learner(cfg, SHAPE, CLASSES, k) for k in range(NODES)]
    data = [node_data(k) for k in range(NODES)]
    played = Played([], [], [], [], [])
    incoming: list[list[Incoming]] = [[] for _ in range(NODES)]
    previous = None
    for server_round in range(1, rounds + 1):
        results = [
            node_round(learner, incoming[k], data[k], server_round)
            for k, learner in enumerate(learners)
        ]
        assert all(not r.intake.rejections for r in results), [r.intake for r in results]
        played.incoming.append(incoming)
        played.payloads.append([r.payload for r in results])
        played.metrics.append([r.metrics for r in results])
        played.states.append([learner.to_bytes() for learner in learners])
        played.private.append(
            [{k: v.detach().clone() for k, v in lr.private_state().items()} for lr in learners]
        )
        if reducer is not None:
            replies = [
                Contribution(k, {n: t.numpy() for n, t in r.payload.items()}, r.metrics)
                for k, r in enumerate(results)
            ]
            previous = reducer(replies, previous)
            aggregate = {k: torch.from_numpy(np.array(v)) for k, v in previous.items()}
            weight = sum(r.metrics[EXAMPLES] for r in results)
            incoming = [from_hub(aggregate, weight) for _ in range(NODES)]
        else:  # the ring: node k hears from node k - 1
            incoming = [
                [Incoming(sent.payload, sender, sent.metrics[EXAMPLES], PEER)]
                if (sent := results[sender := (k - 1) % NODES]).payload
                else []
                for k in range(NODES)
            ]
    return played


@functools.cache
def played_once(method: str) -> Played:
    return play(method)


# -- the exemptions themselves ---------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_exemptions_name_a_check_and_say_why(method):
    exempt = registry.method_spec(method).exempt
    assert set(exempt) <= set(CHECKS), f"{method}: unknown checks {set(exempt) - set(CHECKS)}"
    assert all(reason.strip() for reason in exempt.values())


def test_every_method_has_a_word_in_the_smoke_grid():
    assert {run.cfg.method for run in SMOKE.runs} == set(METHODS)


# -- state -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_a_restored_node_continues_as_the_node_it_was_saved_from(method, request):
    contract(request, method, "state")
    played = played_once(method)
    data = node_data(0)
    for after in range(1, ROUNDS):  # saved after round `after`, restored, the next round
        node = restored(method, played.states[after - 1][0])
        assert not differences(node.shared_payload(), played.payloads[after - 1][0]), after
        result = node_round(node, played.incoming[after][0], data, after + 1)
        assert not differences(result.metrics, played.metrics[after][0]), after
        assert not differences(result.payload, played.payloads[after][0]), after
        continued = saved_state(played.states[after][0])
        assert not differences(node.state_dict(), continued), after


# -- bad-payload -----------------------------------------------------------------------------
def target_entry(payload: Tensors) -> str:
    """The entry to spoil: the first floating-point one with more than one value."""
    floats = [k for k, v in payload.items() if v.is_floating_point() and v.numel() > 1]
    return (floats or list(payload))[0]


def spoiled(payload: Tensors) -> dict[str, tuple[Tensors, str]]:
    """Kind -> (the payload spoiled that way, the entry the refusal must name)."""
    key = target_entry(payload)
    value = payload[key]
    kinds = {
        "misshapen": ({**payload, key: value.flatten()[:-1]}, key),
        "missing": ({k: v for k, v in payload.items() if k != key}, key),
        "unknown": ({**payload, UNKNOWN: torch.zeros(3)}, UNKNOWN),
    }
    if value.is_floating_point():
        nan = value.clone()
        nan.view(-1)[0] = float("nan")
        kinds["nan"] = ({**payload, key: nan}, key)
    return kinds


@pytest.mark.parametrize("method", METHODS)
def test_a_bad_payload_is_refused_naming_its_entry_and_changes_nothing(method, request):
    contract(request, method, "bad-payload")
    played = played_once(method)
    good = played.incoming[1][0]  # what node 0 took in at round 2
    assert good, f"{method}: node 0 received nothing to spoil"
    node = restored(method, played.states[0][0])  # node 0 after round 1
    before = (node.state_dict(), node.shared_payload())
    for kind, (tensors, named) in spoiled(good[-1].tensors).items():
        bad = replace(good[-1], tensors=tensors)
        incoming = [*good[:-1], bad] if bad.from_hub else [*good, bad]  # beside a good one
        with pytest.raises(PayloadError) as refused:
            node.receive(incoming, 2)
        assert named in str(refused.value), (kind, str(refused.value))
        assert not differences((node.state_dict(), node.shared_payload()), before), kind
    wrong_side = (
        [replace(item, sender=0, origin=PEER) for item in good]
        if good[0].from_hub
        else from_hub(good[0].tensors)
    )
    with pytest.raises(PayloadError):
        node.receive(wrong_side, 2)
    assert not differences((node.state_dict(), node.shared_payload()), before), "wrong side"
    node.receive(good, 2)  # what was refused was the spoiling, not the payload


# -- private ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_nothing_a_node_keeps_is_in_what_it_sends(method, request):
    contract(request, method, "private")
    played = played_once(method)
    kept = [private for privates in played.private for private in privates]
    assert any(kept), f"{method} declares nothing it keeps (Learner.private_state)"
    for r, (privates, payloads) in enumerate(zip(played.private, played.payloads, strict=True)):
        for private, payload in zip(privates, payloads, strict=True):
            for name, value in private.items():
                assert name not in payload and name.split(".", 1)[1] not in payload, name
                if not value.is_floating_point() or value.numel() < 2:
                    continue  # a counter or a scalar may coincide by chance
                for key, sent in payload.items():
                    carried = sent.shape == value.shape and sent.dtype == value.dtype
                    assert not (carried and torch.equal(sent, value.cpu())), (r + 1, name, key)


# -- common-start ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_what_nodes_share_starts_identical_on_every_node(method, request):
    contract(request, method, "common-start")
    start_a, start_b = fresh(method, 0).common_start(), fresh(method, 4).common_start()
    assert start_a.keys() == start_b.keys()
    differing = [k for k in start_a if not torch.equal(start_a[k], start_b[k])]
    assert differing == [], f"{method}: partitions 0 and 4 start with different {differing}"


@pytest.mark.parametrize("method", METHODS)
def test_the_common_start_depends_on_the_run_seed(method, request):
    """Not a constant: another seed is another common model (unless nothing is shared)."""
    contract(request, method, "common-start")
    one, other = fresh(method, 0, seed=3).common_start(), fresh(method, 0, seed=4).common_start()
    floats = [k for k, v in one.items() if v.is_floating_point() and v.numel() > 1]
    if floats:
        assert any(not torch.equal(one[k], other[k]) for k in floats)


# -- rerun -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_the_same_seed_plays_the_same_rounds(method, request):
    contract(request, method, "rerun")
    first = played_once(method)
    torch.manual_seed(2024)  # whatever the process drew before
    torch.rand(7)
    again = play(method, rounds=2)
    assert not differences(again.payloads, first.payloads[:2])
    assert not differences(again.metrics, first.metrics[:2])
