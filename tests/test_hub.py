"""The hub of the centralized methods: it reduces with the method's reducer, weights by
examples, never averages a bit-packed mask, and sends every node the same aggregate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from drdfl_flwr.methods.dslth import DSLTHLearner
from drdfl_flwr.payload import from_hub, peers
from drdfl_flwr.records import to_array_record
from drdfl_flwr.registry import build_learner
from strategies.hub import Hub
from strategies.reducers import Contribution, ReductionError, weighted_mean
from strategies.relay import Relay
from strategies.rounds import RoundLoop
from strategies.topology import Ring
from tests.conftest import as_tensors, contribution, make_config
from tests.fake_grid import EVAL_METRICS, FakeGrid

SHAPE, K = (1, 8, 8), 10


def reply(partition: int, examples: float, **arrays: np.ndarray) -> Contribution:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return contribution(partition, record, {"num-examples": examples})


def test_weighted_mean_weights_by_examples():
    a = reply(0, 10.0, w=np.zeros(3, np.float32))
    b = reply(1, 30.0, w=np.full(3, 4.0, np.float32))
    np.testing.assert_allclose(weighted_mean([a, b])["w"], np.full(3, 3.0))


def test_a_dslth_payload_is_never_averaged():
    """Bit-packed masks are uint8 bytes: their mean is meaningless, and refused."""
    cfg = make_config(method="dslth", device="cpu")
    masks = [
        to_array_record(DSLTHLearner(cfg, SHAPE, K, partition_id=p).shared_payload())
        for p in range(2)
    ]
    with pytest.raises(ReductionError, match="never bit-packed masks"):
        weighted_mean([contribution(p, m, {"num-examples": 5.0}) for p, m in enumerate(masks)])


def test_the_hub_refuses_a_method_without_reducer():
    with pytest.raises(ValueError, match="needs a reducer"):
        Hub(None)


def test_drdfl_cfl_hub_averages_learngene_and_stats_by_dataset_size():
    """Algorithm 3: the hub's Learngene and statistics are the |D_m|-weighted mean, and a
    node replaces its Learngene by it (whatever learngene-merge says for the ring)."""
    cfg = make_config(method="drdfl-cfl", device="cpu", drdfl_learngene_merge="average")
    nodes = [build_learner(cfg, SHAPE, K, partition_id=p) for p in range(2)]
    with torch.no_grad():
        for p, node in enumerate(nodes):  # make the two payloads differ
            for param in node.learngene.parameters():
                param.add_(float(p + 1))
    sizes = (100.0, 300.0)
    replies = [
        contribution(p, n.shared_payload(), {"num-examples": s})
        for p, (n, s) in enumerate(zip(nodes, sizes, strict=True))
    ]
    aggregate = as_tensors(weighted_mean(replies))
    payloads = [n.shared_payload() for n in nodes]
    for key, value in aggregate.items():
        want = (sizes[0] * payloads[0][key] + sizes[1] * payloads[1][key]) / sum(sizes)
        torch.testing.assert_close(value, want.float())
        unweighted = (payloads[0][key] + payloads[1][key]) / 2
        if key.startswith("learngene.") and not torch.allclose(payloads[0][key], payloads[1][key]):
            assert not torch.allclose(value, unweighted.float())
    nodes[0].absorb(from_hub(aggregate, weight=sum(sizes)))
    for key, value in nodes[0].shared_payload().items():
        if key.startswith("learngene."):
            torch.testing.assert_close(value, aggregate[key])


def test_hub_round_loop_sends_every_node_the_same_aggregate():
    def payload(partition: int, rnd: int) -> ArrayRecord:
        return ArrayRecord({"w": Array(np.full(4, float(partition + rnd), np.float32))})

    grid = FakeGrid(3, payload_fn=payload)
    records: list[dict] = []
    RoundLoop(
        Hub(weighted_mean), node_wait_timeout=5, on_round=lambda r: records.append(r.to_record())
    ).start(grid, num_rounds=2)
    examples = [10.0, 20.0, 30.0]  # FakeGrid: 10 * (partition + 1)
    want = sum(e * (p + 1) for p, e in enumerate(examples)) / sum(examples)
    for p in range(3):
        content = grid.contents[(p, 2)]
        (name,) = [n for n in content.array_records]
        assert name == "in-payload.hub"
        np.testing.assert_allclose(content[name]["w"].numpy(), np.full(4, want))
        meta = content.config_records["in-meta.hub"]
        assert meta["origin"] == "hub" and meta["weight"] == sum(examples)
        assert records[1]["received_from"][str(p)] == [-1]  # the round report says so
        assert grid.contents[(p, 1)].array_records == {}  # nothing to send before round 1
        # the evaluation of round 1 already carries round 1's aggregate
        evaluated = grid.eval_contents[(p, 1)]["in-payload.hub"]["w"].numpy()
        round_one = sum(e * (q + 1) for q, e in enumerate(examples)) / sum(examples)
        np.testing.assert_allclose(evaluated, np.full(4, round_one))
    assert records[1]["topology"] == "star"
    assert all(n["bytes_sent"] > 0 for n in records[1]["nodes"].values())


def test_hub_methods_are_scored_after_local_training_and_the_aggregate_apart():
    """One evaluation point for the tables: the train message asks every node for its
    Local-T / Global-T after its local round, as on the relay; the fresh aggregate's
    scores come from the evaluation message, under their own ``aggregate_`` names."""
    grid = FakeGrid(3)
    records: list[dict] = []
    RoundLoop(
        Hub(weighted_mean), node_wait_timeout=5, on_round=lambda r: records.append(r.to_record())
    ).start(grid, num_rounds=2)
    assert sorted(grid.evaluated_in_training) == [(p, r) for p in range(3) for r in (1, 2)]
    for record in records:
        for node in record["nodes"].values():
            assert node["local_t_acc"] == EVAL_METRICS["local_t_acc"]
            assert node["aggregate_local_t_acc"] == EVAL_METRICS["local_t_acc"]
            assert node["aggregate_global_t_acc"] == EVAL_METRICS["global_t_acc"]
    assert sorted(grid.eval_contents) == [(p, r) for p in range(3) for r in (1, 2)]


def test_relay_methods_send_no_aggregate_evaluation():
    grid = FakeGrid(3)
    records: list[dict] = []
    RoundLoop(
        Relay(Ring()), node_wait_timeout=5, on_round=lambda r: records.append(r.to_record())
    ).start(grid, num_rounds=2)
    assert grid.eval_contents == {}
    assert not any(k.startswith("aggregate_") for k in records[-1]["mean"])


def test_drdfl_cfl_sets_its_class_statistics_to_the_hubs_and_the_ring_pulls_by_ema():
    """Algorithm 3 line 4: (mu_k, Sigma_k) <- the hub's average, in one round; the
    ring's DRDFL (Algorithm 1) moves toward a peer's by ema-alpha only."""
    aggregate = None
    for method, incoming in (("drdfl-cfl", from_hub), ("drdfl", None)):
        node = build_learner(make_config(method=method, device="cpu"), SHAPE, K)
        if aggregate is None:
            aggregate = node.shared_payload()
            aggregate["stats.mu"] = aggregate["stats.mu"] + 3.0
            aggregate["stats.var"] = aggregate["stats.var"] * 2.0
        before = node.stats.mu.detach().clone()
        node.absorb(incoming(aggregate) if incoming else peers(aggregate))
        mu, var = node.stats.mu.detach(), node.stats.variance().detach()
        if method == "drdfl-cfl":
            torch.testing.assert_close(mu, aggregate["stats.mu"])
            torch.testing.assert_close(var, aggregate["stats.var"])
        else:
            alpha = node.opts.ema_alpha
            torch.testing.assert_close(mu, alpha * before + (1 - alpha) * aggregate["stats.mu"])


def test_the_round_record_names_a_contribution_the_hub_left_out():
    """A node that replies NaN costs only its own contribution: named in the round's
    record (which partition, why), the others averaged as if it had not come."""

    def payload(partition: int, rnd: int) -> ArrayRecord:
        value = float("nan") if partition == 1 else float(partition + rnd)
        return ArrayRecord({"w": Array(np.full(4, value, np.float32))})

    grid = FakeGrid(3, payload_fn=payload)
    records: list[dict] = []
    RoundLoop(
        Hub(weighted_mean), node_wait_timeout=5, on_round=lambda r: records.append(r.to_record())
    ).start(grid, num_rounds=2)
    assert list(records[0]["left_out"]) == ["1"] and "NaN" in records[0]["left_out"]["1"]
    assert records[0]["contributions_left_out"] == 1
    want = (10.0 * 1 + 30.0 * 3) / 40.0  # partitions 0 and 2 of round 1
    content = grid.contents[(0, 2)]
    np.testing.assert_allclose(content["in-payload.hub"]["w"].numpy(), np.full(4, want))
    assert content.config_records["in-meta.hub"]["weight"] == 40.0


def raising(grid: FakeGrid, when) -> FakeGrid:
    """Train messages of the (partition, round) pairs ``when`` picks come back as Flower's
    error for a ClientApp that raised."""
    from flwr.app import Error, Message, MessageType
    from flwr.common.constant import ErrorCode

    answer = grid.answer

    def maybe_raise(msg):
        if msg.metadata.message_type == MessageType.TRAIN:
            partition = grid.partition_of[msg.metadata.dst_node_id]
            if when(partition, int(msg.content["config"]["server-round"])):
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: max attempts")
                return Message(error, reply_to=msg)
        return answer(msg)

    grid.answer = maybe_raise
    return grid


def test_a_round_in_which_every_node_failed_stops_the_run_naming_the_error():
    """Before: every ClientApp raising (a partitioner that cannot draw 1,000 Dirichlet
    partitions) gave a run that 'completed' with 0 bytes and 0 steps. Now the round
    stops the run with the first node's error; a round with some nodes failing goes on."""
    from strategies.rounds import NothingTrainedError

    records: list[dict] = []
    some = raising(FakeGrid(3), lambda p, r: p == 1)
    RoundLoop(
        Relay(Ring()), node_wait_timeout=5, on_round=lambda r: records.append(r.to_record())
    ).start(some, num_rounds=2)
    assert len(records) == 2 and list(records[0]["errors"]) == ["1"]
    every = raising(FakeGrid(3), lambda p, r: r == 2)
    with pytest.raises(NothingTrainedError, match="round 2: none of the 3 nodes asked trained"):
        RoundLoop(Relay(Ring()), node_wait_timeout=5).start(every, num_rounds=3)
