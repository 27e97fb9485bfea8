"""The ClientApp keeps private modules in context.state and puts only the payload on the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto

from drdfl_flwr.client_app import STATE_KEY, evaluate, train
from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.records import decode_received, to_array_record
from drdfl_flwr.registry import build_learner
from strategies.wire import (
    CONFIG,
    EVALUATE_KEY,
    HUB,
    IN_META_PREFIX,
    IN_PAYLOAD_PREFIX,
    METRICS,
    OUT_PAYLOAD,
    add_incoming,
)

RUN = RunConfig(method="drdfl", local_epochs=1).to_run_config()


def context(partition_id: int = 0, num_partitions: int = 3, **changes) -> Context:
    run_config = {**RUN, **{k.replace("_", "-"): v for k, v in changes.items()}}
    return Context(
        run_id=1,
        node_id=partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=run_config,
    )


def train_message(payloads: dict | None = None, server_round: int = 1) -> Message:
    content = RecordDict({CONFIG: ConfigRecord({"server-round": server_round})})
    for sender, payload in (payloads or {}).items():
        add_incoming(content, sender, to_array_record(payload), weight=100.0)
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_private_tensors_never_enter_the_reply():
    ctx = context()
    reply = train(train_message(), ctx)
    learner = build_learner(RunConfig.from_run_config(RUN), (1, 8, 8), 10)
    learner.load_bytes(ctx.state.config_records[STATE_KEY]["blob"])
    wire = message_to_proto(reply).SerializeToString()
    sent = [a.numpy() for rec in reply.content.array_records.values() for a in rec.values()]
    assert list(reply.content.array_records) == [OUT_PAYLOAD]
    private = {
        "persona": learner.persona,
        "decoder": learner.decoder,
        "classifier": learner.classifier,
        "adversary": learner.adversary,
    }
    for name, module in private.items():
        for pname, tensor in module.state_dict().items():
            array = tensor.numpy()
            if array.size < 16:  # tiny biases could collide by chance; weights cannot
                continue
            assert array.tobytes() not in wire, f"{name}.{pname} was serialized into the reply"
            assert not any(s.shape == array.shape and np.array_equal(s, array) for s in sent)
    # the optimizer state and the private modules are in context.state instead
    assert len(ctx.state.config_records[STATE_KEY]["blob"]) > len(wire)


def test_state_survives_between_messages_only_through_context_state():
    ctx = context()
    train(train_message(), ctx)
    train(train_message(server_round=2), ctx)
    learner = build_learner(RunConfig.from_run_config(RUN), (1, 8, 8), 10)
    learner.load_bytes(ctx.state.config_records[STATE_KEY]["blob"])
    assert learner.rounds_trained == 2
    metrics = evaluate(
        Message(RecordDict({}), dst_node_id=0, message_type=MessageType.EVALUATE), ctx
    ).content[METRICS]
    assert 0.0 <= metrics["local_t_acc"] <= 1.0 and 0.0 <= metrics["global_t_acc"] <= 1.0


def test_malformed_neighbour_payload_is_rejected_and_training_goes_on():
    ctx = context()
    sender = build_learner(RunConfig.from_run_config(RUN), (1, 8, 8), 10, partition_id=2)
    bad = sender.shared_payload()
    bad["stats.mu"] = torch.full_like(bad["stats.mu"], float("nan"))
    reply = train(train_message({2: bad}), ctx)
    metrics = reply.content[METRICS]
    assert metrics["payloads_received"] == 1.0 and metrics["payloads_rejected"] == 1.0
    assert all(np.isfinite(a.numpy()).all() for a in reply.content[OUT_PAYLOAD].values())


def test_payloads_arrive_in_numeric_sender_order():
    """'in-payload.10' sorts before 'in-payload.2' as text; the first in-neighbour is 2."""
    content = RecordDict(
        {
            f"{IN_PAYLOAD_PREFIX}{p}": to_array_record({"origin": torch.tensor([p])})
            for p in (10, 2, 33, 7)
        }
    )
    incoming, _ = decode_received(content)
    assert [int(p.tensors["origin"]) for p in incoming] == [2, 7, 10, 33]
    content[f"{IN_PAYLOAD_PREFIX}x"] = to_array_record({"origin": torch.tensor([0])})
    incoming, rejections = decode_received(content)
    assert len(incoming) == 4 and "does not name a sender" in rejections["x"]


def test_what_arrives_says_who_sent_it_with_what_weight_and_from_where():
    content = RecordDict()
    add_incoming(content, 4, to_array_record({"a": torch.ones(2)}), weight=120.0)
    add_incoming(content, HUB, to_array_record({"a": torch.zeros(2)}), weight=900.0)
    (peer, hub), _ = decode_received(content)
    assert (peer.sender, peer.weight, peer.origin, peer.from_hub) == (4, 120.0, "peer", False)
    assert (hub.sender, hub.weight, hub.origin, hub.from_hub) == (-1, 900.0, "hub", True)
    content[f"{IN_META_PREFIX}4"] = ConfigRecord({"weight": -3.0, "origin": "peer"})
    (only_hub,), rejections = decode_received(content)
    assert only_hub.from_hub and "invalid weight" in rejections["4"]
    # a peer's record that says it is the hub's aggregate is refused, not believed
    content[f"{IN_META_PREFIX}4"] = ConfigRecord({"weight": 3.0, "origin": "hub"})
    (only_hub,), rejections = decode_received(content)
    assert only_hub.from_hub and "origin 'hub'" in rejections["4"]


def test_isolated_node_absorbs_nothing_and_sends_nothing():
    """``isolated`` cuts collaboration and nothing else: an isolated node that is handed a
    neighbour's payload trains exactly as a node that received none."""
    sender = build_learner(RunConfig.from_run_config(RUN), (1, 8, 8), 10, partition_id=2)
    payload = sender.shared_payload()
    isolated, alone, sharing = context(isolated=True), context(), context()
    reply = train(train_message({2: payload}), isolated)
    train(train_message(), alone)
    train(train_message({2: payload}), sharing)
    assert len(reply.content[OUT_PAYLOAD]) == 0
    assert reply.content[METRICS]["payloads_received"] == 0.0
    blob = isolated.state.config_records[STATE_KEY]["blob"]
    assert blob == alone.state.config_records[STATE_KEY]["blob"]
    assert blob != sharing.state.config_records[STATE_KEY]["blob"]


def test_hub_method_evaluates_the_fresh_aggregate_without_keeping_it():
    """FedAvg's Local-T/Global-T are those of the global model the evaluation message
    brings; the node's saved state is untouched by it."""
    ctx = context(method="fedavg")
    train(train_message(), ctx)
    before = ctx.state.config_records[STATE_KEY]["blob"]
    cfg = RunConfig.from_run_config(ctx.run_config)
    other = build_learner(cfg, (1, 8, 8), 10, partition_id=2)
    content = RecordDict({CONFIG: ConfigRecord({"server-round": 1})})
    add_incoming(content, HUB, to_array_record(other.shared_payload()), weight=300.0)
    message = Message(content, dst_node_id=0, message_type=MessageType.EVALUATE)
    metrics = evaluate(message, ctx).content[METRICS]
    data = load_client_data(cfg, 0, 3)
    assert metrics["local_t_acc"] == other.accuracy(data.x_local_test, data.y_local_test)
    assert ctx.state.config_records[STATE_KEY]["blob"] == before


def saved_learner(ctx: Context):
    learner = build_learner(RunConfig.from_run_config(ctx.run_config), (1, 8, 8), 10)
    learner.load_bytes(ctx.state.config_records[STATE_KEY]["blob"])
    return learner


def test_a_warm_learner_gives_exactly_what_a_reload_from_context_state_gives():
    """Keeping the learner alive between messages is an optimisation only: the same
    replies and the same saved state as rebuilding it from context.state every time."""
    warm, cold = context(), context(warm_cache_mib=0)
    for _ in range(3):
        replies = [train(train_message(), ctx) for ctx in (warm, cold)]
        for name, array in replies[0].content[OUT_PAYLOAD].items():
            assert np.array_equal(array.numpy(), replies[1].content[OUT_PAYLOAD][name].numpy())
    for (name, a), (_, b) in zip(
        saved_learner(warm).classifier.state_dict().items(),
        saved_learner(cold).classifier.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_context_state_wins_over_a_warm_learner_that_holds_another_state():
    """A node whose context.state was written elsewhere (another process, an older copy)
    continues from that state, not from whatever this process kept warm."""
    ctx = context()
    train(train_message(), ctx)
    after_one = ConfigRecord(dict(ctx.state.config_records[STATE_KEY]))
    train(train_message(server_round=2), ctx)  # this process now holds the learner after two
    ctx.state.config_records[STATE_KEY] = after_one
    train(train_message(server_round=2), ctx)
    assert saved_learner(ctx).rounds_trained == 2


def test_a_train_message_can_ask_for_the_evaluation_too():
    msg = train_message()
    msg.content[CONFIG][EVALUATE_KEY] = True
    metrics = train(msg, context()).content[METRICS]
    assert 0.0 <= metrics["local_t_acc"] <= 1.0 and 0.0 <= metrics["global_t_acc"] <= 1.0
    assert "local_t_acc" not in train(train_message(), context()).content[METRICS]


@pytest.mark.parametrize("method", ["fedavg", "dfedpgp"])
def test_a_round_scores_the_model_the_node_holds_after_fit(method):
    """Local-T / Global-T of a train message are those of the model after this round's
    local training (what the node saved), whatever the method, hub or relay."""
    ctx = context(method=method, classifier_norm="batch")
    cfg = RunConfig.from_run_config(ctx.run_config)
    sender = build_learner(cfg, (1, 8, 8), 10, partition_id=2)
    msg = train_message()
    add_incoming(
        msg.content,
        HUB if method == "fedavg" else 2,
        to_array_record(sender.shared_payload()),
        weight=100.0,
    )
    msg.content[CONFIG]["server-round"] = 2
    msg.content[CONFIG][EVALUATE_KEY] = True
    metrics = train(msg, ctx).content[METRICS]
    trained = saved_learner(ctx)
    assert trained.rounds_trained == 1
    data = load_client_data(cfg, 0, 3)
    assert metrics["local_t_acc"] == trained.accuracy(data.x_local_test, data.y_local_test)
    assert metrics["global_t_acc"] == trained.accuracy(data.x_global_test, data.y_global_test)


# -- a device's own data: node config data-dir wins over the run config's ------------------


def digits_parquet(folder, rows: int):
    """A parquet folder (the hub's layout) of the first ``rows`` training digits."""
    from drdfl_flwr.data import _digits_splits

    train, test = _digits_splits(0)
    folder.mkdir()
    train.select(range(rows)).to_parquet(str(folder / "train.parquet"))
    test.to_parquet(str(folder / "test.parquet"))
    return folder


def test_a_node_config_data_dir_wins_over_the_run_configs(tmp_path):
    from drdfl_flwr.client_app import node_run_config

    own = digits_parquet(tmp_path / "on-this-device", rows=300)
    ctx = context(data_dir="")  # the run config: embedded digits, 1,347 training images
    ctx.node_config["data-dir"] = str(own)
    cfg = node_run_config(ctx)
    assert cfg.data_dir == str(own)
    on_device = len(load_client_data(cfg, 0, 3).y_train)
    embedded = len(load_client_data(RunConfig.from_run_config(ctx.run_config), 0, 3).y_train)
    assert on_device < embedded  # a share of 300 images, not of 1,347
    reply = train(train_message(), ctx)
    assert reply.content[METRICS]["num-examples"] == on_device


def test_a_wrong_node_config_data_dir_is_named_as_the_nodes(tmp_path):
    from drdfl_flwr.client_app import node_run_config
    from drdfl_flwr.config import ConfigError

    ctx = context()
    ctx.node_config["data-dir"] = str(tmp_path / "not-here")
    with pytest.raises(
        ConfigError, match=r"data-dir \(from this node's --node-config, partition 0"
    ):
        node_run_config(ctx)
