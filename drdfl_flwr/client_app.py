"""The ClientApp: one node's side of every round, for any registered method.

Each message runs with only ``context.state`` carried over from earlier rounds (in a
deployment every message may run in a fresh process), so the learner's private state,
optimizers included, is restored from and saved back to ``context.state`` every time.
Nothing private ever goes into a reply: the reply holds the learner's
``shared_payload()`` and scalar metrics, and that is all.
"""

from __future__ import annotations

import uuid
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import log

from drdfl_flwr.checkpoint import (
    IDLE_STATE_FOLDER,
    checkpoint_path,
    data_cache_dir,
    digest,
    read_checkpoint,
    read_state_file,
    write_checkpoint,
)
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import ClientData, load_client_data
from drdfl_flwr.learner import Learner
from drdfl_flwr.node import Stopwatch, node_evaluation, node_round
from drdfl_flwr.own_data import load_own_data, own_data_folders
from drdfl_flwr.records import decode_received, to_array_record
from drdfl_flwr.registry import build_learner, recorded_run_config
from drdfl_flwr.saved_models import model_path, save_node_model
from drdfl_flwr.warm import WARM
from strategies.wire import (
    CONFIG,
    EVALUATE_KEY,
    METRICS,
    NUM_PARTITIONS,
    OUT_PAYLOAD,
    PARTITION_ID,
    REJECTIONS,
    RUN_FOLDER,
    RUN_KEY,
    SERVER_ROUND,
)

STATE_KEY = "learner"
NODE_DATA_DIR = "data-dir"  # node config: this device's own copy of the dataset


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, with a clear error if absent."""
    try:
        return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    except KeyError as missing:
        raise KeyError(
            f"node config lacks {missing}; start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<M>'"
        ) from None


def node_run_config(context: Context) -> RunConfig:
    """The run config as this node runs it. A node config's ``data-dir`` (the device's
    own copy of the dataset, where it keeps it) wins over the run config's, which names
    a folder of the machine the run was submitted from; every node still partitions the
    same dataset the same way, so the copies must be the same files."""
    values = dict(context.run_config)
    local = context.node_config.get(NODE_DATA_DIR)
    if local:
        values[NODE_DATA_DIR] = str(local)
    try:
        return RunConfig.from_run_config(values)
    except ConfigError as err:
        if local and err.key == NODE_DATA_DIR:
            raise ConfigError(
                f"data-dir (from this node's --node-config, partition "
                f"{context.node_config.get(PARTITION_ID, '?')})",
                err.value,
                err.reason,
            ) from None
        raise


def warm_key(context: Context) -> tuple[int, int, int]:
    return context.run_id, context.node_id, node_partition(context)[0]


def server_round(msg: Message) -> int:
    """The round the relay sent this message in (0 when absent: a message from elsewhere)."""
    return int(msg.content.config_records.get(CONFIG, ConfigRecord()).get(SERVER_ROUND, 0))


def run_key(msg: Message, context: Context) -> str:
    """The run whose checkpoints this message belongs to (see drdfl_flwr.checkpoint)."""
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    return str(config.get(RUN_KEY, context.run_id))


def restore(
    context: Context, key: str, clock: Stopwatch | None = None
) -> tuple[ClientData, Learner, bool]:
    """The node's data and its learner as ``context.state`` holds it: the warm learner of
    this process when it holds that very state (see :mod:`drdfl_flwr.warm`), else built
    and loaded from the saved bytes, else (a restarted SuperNode, a resumed run) from the
    node's checkpoint of run ``key``. The flag says whether it was warm."""
    cfg = node_run_config(context)
    partition_id, num_partitions = node_partition(context)
    own, common_test = own_data_folders(context.node_config)
    if own is not None and cfg.oracle_absent_per_class:
        raise ConfigError(
            "oracle-absent-per-class",
            cfg.oracle_absent_per_class,
            "is a simulation diagnostic (it draws other partitions' images); this node "
            "trains on its own-data folder",
        )
    if own is not None:  # the device's own files, whole
        data = load_own_data(cfg, own, partition_id, common_test)
    else:
        data = load_client_data(cfg, partition_id, num_partitions, data_cache_dir(context))
    if clock is not None:
        clock.lap("time_load_data")
    saved = context.state.config_records.get(STATE_KEY)
    token = str(saved["token"]) if saved is not None and "token" in saved else None
    learner = WARM.take(warm_key(context), token)
    if learner is not None:
        return data, learner, True
    learner = build_learner(cfg, data.input_shape, data.num_classes, partition_id)
    if saved is not None:
        learner.load_bytes(saved_blob(saved))
    else:
        blob = read_checkpoint(checkpoint_path(context, partition_id, key))
        if blob is not None:
            learner.load_bytes(blob)
            log(
                INFO,
                "partition %d resumed from its checkpoint (%d rounds trained)",
                partition_id,
                learner.rounds_trained,
            )
    return data, learner, False


def save(context: Context, learner: Learner, key: str, run_folder: str = "") -> None:
    """Write the private state into ``context.state`` under a fresh token (and into the
    node's checkpoint of run ``key``), and keep the learner warm for the next message.
    With ``idle-state = "disk"`` the state goes to a file and ``context.state`` keeps
    only where it is, its size and digest: Flower holds every node's context in memory,
    and at low participation most of them wait rounds for their next turn."""
    blob, token = learner.to_bytes(), uuid.uuid4().hex
    path = checkpoint_path(context, learner.partition_id, key)
    if learner.cfg.idle_state == "disk":
        path = path or idle_state_path(learner, run_folder)
        write_checkpoint(path, blob)
        record = {"file": str(path), "size": len(blob), "sha256": digest(blob), "token": token}
        context.state.config_records[STATE_KEY] = ConfigRecord(record)
    else:
        context.state.config_records[STATE_KEY] = ConfigRecord({"blob": blob, "token": token})
        if path is not None:
            write_checkpoint(path, blob)
    keep_warm(context, learner, token)


def idle_state_path(learner: Learner, run_folder: str) -> Path:
    """``<results-dir>/<run>/node-state/partition-<p>.pt`` for a node with no
    checkpoint-dir (a simulated one: the run's folder is on its machine)."""
    if not run_folder:
        raise ConfigError(
            "idle-state",
            learner.cfg.idle_state,
            "needs the node's checkpoint-dir or a run-folder in the message (the ServerApp "
            'sends it with idle-state = "disk")',
        )
    folder = Path(learner.cfg.results_dir) / run_folder / IDLE_STATE_FOLDER
    return folder / f"partition-{learner.partition_id}.pt"


def saved_blob(saved: ConfigRecord) -> bytes:
    """The saved state, from ``context.state`` or from the file it names."""
    if "file" in saved:
        return read_state_file(Path(str(saved["file"])), str(saved["sha256"]))
    return saved["blob"]


def keep_model(
    learner: Learner, data: ClientData, round_config: ConfigRecord, trained_round: int
) -> None:
    """``save-models``: the node's model, on its own disk, filed with the run's records."""
    run_folder = str(round_config.get(RUN_FOLDER, ""))
    if not run_folder:
        log(WARNING, "save-models: the message names no run-folder; the model is not saved")
        return
    path = model_path(learner.cfg.results_dir, run_folder, learner.partition_id)
    save_node_model(
        path, learner, trained_round, data.input_shape, recorded_run_config(learner.cfg)
    )


def keep_warm(context: Context, learner: Learner, token: str) -> None:
    WARM.put(warm_key(context), token, learner, learner.cfg.warm_cache_mib * 2**20)


def describe(msg: Message, context: Context) -> Message:
    """Tell the relay where this node sits in the ring."""
    partition_id, num_partitions = node_partition(context)
    info = ConfigRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    return Message(RecordDict({CONFIG: info}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Take in the in-neighbours' payloads, train one round (:func:`node_round`), save the
    private state, reply with the own payload and the metrics. The reasons for every
    refused payload go back to the router."""
    clock = Stopwatch()
    round_config = msg.content.config_records.get(CONFIG, ConfigRecord())
    key = run_key(msg, context)
    data, learner, warm = restore(context, key, clock)
    clock.lap("time_restore")
    incoming, undecodable = decode_received(msg.content)
    result = node_round(
        learner,
        incoming,
        data,
        server_round(msg),
        evaluate=bool(round_config.get(EVALUATE_KEY, False)),  # the router asks for it
        undecodable=undecodable,
        clock=clock,
    )
    for sender, reason in result.intake.rejections.items():
        log(
            WARNING,
            "partition %d rejected the payload of sender %s: %s",
            learner.partition_id,
            sender,
            reason,
        )
    save(context, learner, key, str(round_config.get(RUN_FOLDER, "")))
    if learner.cfg.save_models:
        keep_model(learner, data, round_config, server_round(msg))
    clock.lap("time_save")
    metrics = {**result.metrics, "warm_start": float(warm), **clock.laps}
    content = RecordDict(
        {OUT_PAYLOAD: to_array_record(result.payload), METRICS: MetricRecord(metrics)}
    )
    if result.intake.rejections:
        content[REJECTIONS] = ConfigRecord(result.intake.rejections)
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Local-T and Global-T of the node's model. A hub method's evaluation message carries
    the round's fresh aggregate: the node evaluates the model it will train from next
    (FedAvg's global model; FedRep's global body with its own head), without keeping it;
    the next train message brings the same aggregate for good."""
    clock = Stopwatch()
    data, learner, _ = restore(context, run_key(msg, context))
    clock.lap("time_eval_restore")
    incoming, undecodable = decode_received(msg.content)
    metrics, intake = node_evaluation(
        learner, incoming, data, server_round(msg), undecodable, clock=clock
    )
    for sender, reason in intake.rejections.items():
        log(
            WARNING,
            "partition %d evaluates without %s's payload: %s",
            learner.partition_id,
            sender,
            reason,
        )
    saved = context.state.config_records.get(STATE_KEY)
    if not intake.accepted and saved is not None:  # unchanged: still the saved state
        keep_warm(context, learner, str(saved["token"]))
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


def with_run_config(overrides: dict) -> Mod:
    """A mod that puts ``overrides`` into the run config (in-process runs, notebooks).

    Flower refuses a changed ``context.run_config`` after a handler returns, so the
    original is put back once the handler is done.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        original = dict(context.run_config)
        context.run_config.update(overrides)
        try:
            return call_next(msg, context)
        finally:
            context.run_config.clear()
            context.run_config.update(original)

    return mod


def build_client_app(mods: list[Mod] | None = None) -> ClientApp:
    client_app = ClientApp(mods=mods or [])
    client_app.query()(describe)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = build_client_app()
