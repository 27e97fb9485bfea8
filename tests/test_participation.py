"""Partial participation (``participation``, FedAvg's client sampling) on both routers:
each round a seeded draw of the ring positions trains, the others are not messaged and
keep their state, the relay routes around them like dead nodes and marks the payloads
they left behind with the round they were made in, the hub reduces the participants'
replies only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, MessageType, RecordDict

from drdfl_flwr.client_app import STATE_KEY
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.inprocess import InProcessGrid
from drdfl_flwr.records import decode_received
from drdfl_flwr.server_app import app as SERVER_APP
from drdfl_flwr.server_app import round_events
from strategies.hub import Hub
from strategies.membership import ACTIVE, sample_participants
from strategies.reducers import weighted_mean
from strategies.relay import Relay
from strategies.rounds import RoundLoop, RoundReport
from strategies.topology import Ring
from strategies.wire import MADE_IN_ROUND, add_incoming, in_meta_name
from tests.fake_grid import FakeGrid


def run(grid: FakeGrid, rounds: int, router=None, **loop_args) -> tuple[RoundLoop, list[dict]]:
    loop, reports = run_reports(grid, rounds, router, **loop_args)
    return loop, [report.to_record() for report in reports]


def run_reports(
    grid: FakeGrid, rounds: int, router=None, **loop_args
) -> tuple[RoundLoop, list[RoundReport]]:
    reports: list[RoundReport] = []
    loop = RoundLoop(
        router or Relay(Ring()),
        node_wait_timeout=5,
        round_timeout=1,
        on_round=reports.append,
        **loop_args,
    )
    loop.start(grid, num_rounds=rounds)
    return loop, reports


# -- the draw ----------------------------------------------------------------------------
def test_sampling_is_deterministic_per_seed_and_round_and_differs_across_rounds():
    draws = [sample_participants(42, r, 10, 0.3) for r in range(1, 9)]
    assert draws == [sample_participants(42, r, 10, 0.3) for r in range(1, 9)]
    assert len({tuple(d) for d in draws}) > 1  # a new draw each round
    assert draws != [sample_participants(7, r, 10, 0.3) for r in range(1, 9)]  # and seed
    for r, drawn in enumerate(draws, start=1):
        assert drawn == sorted(set(drawn)) and set(drawn) <= set(range(10))
        rng = np.random.default_rng([42, r])  # the documented recipe
        assert drawn == sorted(rng.choice(10, size=3, replace=False).tolist())


@pytest.mark.parametrize(
    ("num_nodes", "participation", "size"),
    [(10, 0.3, 3), (10, 0.01, 1), (7, 0.5, 4), (4, 0.5, 2), (3, 0.2, 1), (5, 1.0, 5)],
)
def test_sample_size_is_max_1_round_p_times_m(num_nodes, participation, size):
    assert size == max(1, round(participation * num_nodes))
    for r in (1, 2, 3):
        assert len(sample_participants(0, r, num_nodes, participation)) == size


def test_the_draw_does_not_depend_on_who_is_alive():
    _, healthy = run(FakeGrid(6), 4, participation=0.5, seed=3)
    _, failing = run(FakeGrid(6, fail=lambda p, r: p in (0, 2)), 4, participation=0.5, seed=3)
    want = [sample_participants(3, r, 6, 0.5) for r in range(1, 5)]
    assert [r["participants"] for r in healthy] == [r["participants"] for r in failing] == want


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -1, float("nan")])
def test_participation_outside_0_1_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match="participation") as err:
        RunConfig.from_run_config({"participation": value})
    assert err.value.key == "participation"
    with pytest.raises(ValueError, match="participation"):
        RoundLoop(Relay(Ring()), participation=value)


def test_participation_defaults_to_everyone_and_accepts_a_fraction():
    assert RunConfig().participation == 1.0
    assert RunConfig.from_run_config({"participation": 0.25}).participation == 0.25
    assert RunConfig.from_run_config({"participation": 1}).participation == 1.0


# -- who is messaged ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["synchronous", "sequential"])
def test_default_participation_leaves_every_node_training_every_round(mode):
    grid = FakeGrid(4)
    _, reports = run_reports(grid, 3, mode=mode)
    records = [report.to_record() for report in reports]
    assert sorted(grid.sent) == [(p, r) for p in range(4) for r in (1, 2, 3)]
    for record, report in zip(records, reports, strict=True):
        assert record["participants"] == [0, 1, 2, 3]
        assert record["stale"] == {} and record["failed"] == []
        assert round_events(report) == []  # the progress line says nothing more
    explicit = FakeGrid(4)
    _, same = run(explicit, 3, mode=mode, participation=1.0, seed=99)
    assert explicit.order == grid.order
    for key, arrays in grid.received.items():
        assert [a.tolist() for a in explicit.received[key]] == [a.tolist() for a in arrays]
    timings = ("seconds", "discovery_seconds")
    strip = [{k: v for k, v in r.items() if k not in timings} for r in records]
    assert strip == [{k: v for k, v in r.items() if k not in timings} for r in same]


@pytest.mark.parametrize("mode", ["synchronous", "sequential"])
def test_a_node_that_sits_out_is_not_messaged_failed_or_suspended(mode):
    grid = FakeGrid(6)
    loop, reports = run_reports(grid, 5, mode=mode, participation=0.5, seed=42)
    records = [report.to_record() for report in reports]
    drawn = {r: sample_participants(42, r, 6, 0.5) for r in range(1, 6)}
    assert sorted(grid.sent) == sorted((p, r) for r, ps in drawn.items() for p in ps)
    if mode == "sequential":  # participants one after another, in ring order
        assert grid.order == [(p, r) for r in range(1, 6) for p in drawn[r]]
    for record, report in zip(records, reports, strict=True):
        participants = drawn[record["round"]]
        assert record["participants"] == participants
        assert record["failed"] == [] and record["rejoined"] == []
        # the round's means are over the participants: only they are in the record
        assert sorted(record["nodes"]) == sorted(str(p) for p in participants)
        assert sorted(record["received_from"]) == sorted(str(p) for p in participants)
        assert f"3/6 taking part {participants}" in round_events(report)
    assert loop.membership.states == [ACTIVE] * 6


def test_a_node_back_from_the_dead_that_sits_out_is_not_failed_again():
    """A restarted node admitted between rounds but not drawn waits, neither failed nor
    suspended again, until it is drawn."""
    grid = FakeGrid(4, fail=lambda p, r: p == 1 and r == 1)
    _, records = run(grid, 6, participation=0.5, seed=42)
    drawn = {r: sample_participants(42, r, 4, 0.5) for r in range(1, 7)}
    assert 1 in drawn[1]  # it fails in round 1 ...
    assert records[0]["failed"] == [1]
    assert [rec["rejoined"] for rec in records[1:]].count([1]) == 1  # ... rejoins once
    assert all(rec["failed"] == [] for rec in records[1:])
    later = [r for r in range(2, 7) if 1 in drawn[r]]
    assert [r for p, r in grid.sent if p == 1] == [1, *later]


# -- the relay ---------------------------------------------------------------------------
def expected_routing(mode: str, drawn: dict[int, list[int]], num_nodes: int):
    """(partition, round) -> [(sender, round its payload was made in)] on the directed
    ring: the nearest participating predecessor, if it has sent anything yet."""
    made: dict[int, int] = {}
    routed = {}
    for r in sorted(drawn):
        before = dict(made)
        for p in drawn[r]:
            source = made if mode == "sequential" else before
            q = next(
                (p - d) % num_nodes for d in range(1, num_nodes) if (p - d) % num_nodes in drawn[r]
            )
            routed[(p, r)] = [(q, source[q])] if q in source else []
            made[p] = r
    return routed


@pytest.mark.parametrize("mode", ["synchronous", "sequential"])
def test_relay_bypasses_non_participants_and_marks_stale_payloads_with_their_round(mode):
    grid = FakeGrid(6)
    _, records = run(grid, 6, mode=mode, participation=0.5, seed=40)
    drawn = {r: sample_participants(40, r, 6, 0.5) for r in range(1, 7)}
    stale_seen = 0
    for (p, r), senders in expected_routing(mode, drawn, 6).items():
        assert [a.tolist() for a in grid.received[(p, r)]] == [[q, made] for q, made in senders]
        record = records[r - 1]
        assert record["received_from"][str(p)] == [q for q, _ in senders]
        for q, made in senders:
            meta = grid.contents[(p, r)].config_records[in_meta_name(q)]
            if made < r - 1:  # its sender sat out the previous round
                stale_seen += 1
                assert meta[MADE_IN_ROUND] == made
                assert record["stale"][str(p)][str(q)] == made
            else:
                assert MADE_IN_ROUND not in meta and str(p) not in record["stale"]
    assert stale_seen > 0


def test_a_sitting_out_senders_payload_stays_stored_until_replaced():
    grid = FakeGrid(4)
    loop, _ = run(grid, 4, participation=0.5, seed=42)
    last_made = {}
    for r in range(1, 5):
        for p in sample_participants(42, r, 4, 0.5):
            last_made[p] = r
    assert sorted(loop.router.payloads) == sorted(last_made)
    for p, r in last_made.items():
        assert loop.router.payloads[p]["origin"].numpy().tolist() == [p, r]
        assert loop.router.made_in[p] == r


def test_the_node_side_reads_past_a_made_in_round_mark():
    content = RecordDict()
    payload = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    add_incoming(content, 2, payload, 5.0, made_in_round=3)
    assert content.config_records[in_meta_name(2)][MADE_IN_ROUND] == 3
    (incoming,), rejections = decode_received(content)
    assert rejections == {} and incoming.sender == 2 and incoming.weight == 5.0


# -- the hub -----------------------------------------------------------------------------
def test_hub_aggregates_over_participants_only_and_sends_it_to_participants_only():
    def payload(partition: int, rnd: int) -> ArrayRecord:
        return ArrayRecord({"w": Array(np.full(4, float(10 * partition + rnd), np.float32))})

    grid = FakeGrid(4, payload_fn=payload)
    _, records = run(grid, 4, router=Hub(weighted_mean), participation=0.5, seed=42)
    drawn = {r: sample_participants(42, r, 4, 0.5) for r in range(1, 5)}
    examples = {p: 10.0 * (p + 1) for p in range(4)}  # FakeGrid's num-examples
    for r in range(1, 5):
        ps = drawn[r]
        mean = sum(examples[p] * (10 * p + r) for p in ps) / sum(examples[p] for p in ps)
        everyone = sum(examples[p] * (10 * p + r) for p in range(4)) / sum(examples.values())
        assert mean != everyone
        # the round's evaluation carries the fresh aggregate, to participants only
        assert sorted(p for p, rnd in grid.eval_contents if rnd == r) == ps
        for p in ps:
            got = grid.eval_contents[(p, r)]["in-payload.hub"]["w"].numpy()
            np.testing.assert_allclose(got, np.full(4, mean), rtol=1e-6)
            meta = grid.eval_contents[(p, r)].config_records["in-meta.hub"]
            assert meta["weight"] == sum(examples[q] for q in ps)
        if r < 4:  # the next round's participants train from it
            for p in drawn[r + 1]:
                got = grid.contents[(p, r + 1)]["in-payload.hub"]["w"].numpy()
                np.testing.assert_allclose(got, np.full(4, mean), rtol=1e-6)
        assert sorted(p for p, rnd in grid.sent if rnd == r) == ps
        assert sorted(records[r - 1]["nodes"]) == [str(p) for p in ps]


# -- real nodes --------------------------------------------------------------------------
class TokenGrid(InProcessGrid):
    """Notes every node's saved-state token after each train reply."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snapshots: list[tuple[int, dict[int, str | None]]] = []  # (trained node, tokens)

    def pull_messages(self, message_ids):
        replies = []
        for message_id in list(message_ids):
            message = self.pending.get(message_id)
            replies += super().pull_messages([message_id])
            if message is not None and message.metadata.message_type == MessageType.TRAIN:
                self.snapshots.append((message.metadata.dst_node_id, self.tokens()))
        return replies

    def tokens(self) -> dict[int, str | None]:
        saved = {n: c.state.config_records.get(STATE_KEY) for n, c in self.contexts.items()}
        return {n: None if s is None else str(s["token"]) for n, s in saved.items()}


@pytest.mark.parametrize("method", ["drdfl", "fedavg"])
def test_a_sitting_out_node_keeps_its_state_and_counts_only_the_rounds_it_trained(method, tmp_path):
    cfg = RunConfig(
        method=method,
        dataset="digits",
        device="cpu",
        num_server_rounds=4,
        local_epochs=1,
        batch_size=32,
        subset_train=240,
        subset_test=120,
        participation=0.5,
        results_dir=str(tmp_path),
        run_name="run",
    )
    grid = TokenGrid(cfg.to_run_config(), 4, run_id=4242)
    server = Context(
        run_id=4242, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    SERVER_APP(grid, server)
    drawn = {r: sample_participants(cfg.seed, r, 4, 0.5) for r in range(1, 5)}
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in records] == [drawn[r] for r in range(1, 5)]
    assert grid.handled[MessageType.TRAIN] == sum(len(ps) for ps in drawn.values())
    for record in records:
        r = record["round"]
        assert record["failed"] == []
        assert sorted(record["nodes"]) == [str(p) for p in drawn[r]]
        for p in drawn[r]:
            took_part = sum(p in drawn[s] for s in range(1, r + 1))
            assert record["nodes"][str(p)]["rounds_trained"] == took_part
    # a node's saved state changes when it trains, and only then
    previous = {n: None for n in grid.contexts}
    for trained, tokens in grid.snapshots:
        for node, token in tokens.items():
            if node == trained:
                assert token != previous[node]
            else:
                assert token == previous[node]
        previous = tokens


def test_a_progress_line_names_a_dozen_partitions_and_counts_the_rest():
    """1,000 clients at 10 %: the line says 100/1000 and names 12, not 100 numbers."""
    from drdfl_flwr.server_app import round_events
    from strategies.rounds import RoundReport

    report = RoundReport(1, "synchronous", "ring")
    report.node_ids = {p: p + 1 for p in range(1000)}
    report.participants = list(range(0, 1000, 10))
    (line,) = round_events(report)
    assert (
        line
        == "100/1000 taking part [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, ... 88 more]"
    )
