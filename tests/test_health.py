"""Health alarms reach the user once when raised, once when cleared, and at the end."""

from __future__ import annotations

from drdfl_flwr.health import AlarmTracker, health_view


def nodes(*raised: int, total: int = 3) -> dict[str, dict[str, float]]:
    return {
        str(p): {"alarm_zl_unused": float(p in raised), "health_x": 1.0, "l_ce": 2.0}
        for p in range(total)
    }


def test_alarm_is_reported_when_raised_cleared_and_at_the_last_round():
    tracker = AlarmTracker()
    assert tracker.update(1, nodes(), last=False) == []
    (raised,) = tracker.update(2, nodes(0, 2), last=False)
    assert raised[0] and "raised on 2 of 3 nodes (partitions 0,2)" in raised[1]
    assert "Learngene" in raised[1]  # the explanation, not just the key
    assert tracker.update(3, nodes(0), last=False) == []  # still on: no repeat
    (cleared,) = tracker.update(4, nodes(), last=False)
    assert not cleared[0] and "cleared" in cleared[1]
    tracker.update(5, nodes(1), last=False)
    (reminder,) = tracker.update(6, nodes(1), last=True)
    assert reminder[0] and "still raised at the last round" in reminder[1]


def test_health_view_keeps_only_health_and_alarms():
    assert health_view(nodes(1)["1"]) == {"alarm_zl_unused": 1.0, "health_x": 1.0}


def test_fedfed_alarms_are_explained_beside_drdfl_s():
    """FedFed's two alarms reach the progress output with what they mean, not as bare
    keys; a node raising both yields one message each."""
    per_node = {
        "0": {"alarm_fedfed_generator_idle": 1.0, "alarm_fedfed_share_near_raw": 1.0},
        "1": {"alarm_fedfed_generator_idle": 1.0, "alarm_fedfed_share_near_raw": 0.0},
    }
    messages = AlarmTracker().update(4, per_node, last=False)
    assert len(messages) == 2 and all(warn for warn, _ in messages)
    idle, near_raw = sorted((text for _, text in messages), key=lambda t: "pixel variance" not in t)
    assert "(partitions 0,1): FedFed's generator" in idle and "pixel variance" in idle
    assert "(partitions 0): FedFed's shared features are close to the raw images" in near_raw
