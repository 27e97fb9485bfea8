"""Mechanism health: the per-round numbers that show a method's defining idea at work.

Tests can pass while the science fails (a Learngene that carries nothing, scores that
grow without bound), so every method reports, each round and per node, the metrics that
would reveal it. Their keys start with ``health_``; a key starting with ``alarm_`` is a
0/1 flag that a node raises when its mechanism is visibly broken. The node logs the
alarm, the ServerApp repeats it in the progress output with the text below, and the
summary keeps the last round's health means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEALTH_PREFIX = "health_"
ALARM_PREFIX = "alarm_"

# alarm key -> what it means and what to look at. One entry per alarm a method can raise.
ALARMS: dict[str, str] = {
    "alarm_zl_unused": (
        "DRDFL's Learngene code z_l is unused: replacing it by prior samples changes the "
        "reconstruction by less than 1 %, so the shared Learngene carries no information "
        "(check drdfl-training, drdfl-ablation and the latent sizes)"
    ),
    "alarm_fedfed_generator_idle": (
        "FedFed's generator explains less than half the pixel variance beyond the mean "
        "image (gen_rel_err > 0.5, worse than a 4-component PCA), so the "
        "'performance-sensitive' features x - x_hat it shares keep most of each image "
        "(train it longer: fedfed.distill-epochs, distill-rounds, weight-rec)"
    ),
    "alarm_fedfed_share_near_raw": (
        "FedFed's shared features are close to the raw images (share_psnr_db > 20 dB "
        "against their source images): the pool is near-raw data, a privacy leak, and any "
        "gain is that of pooling data rather than of feature distillation (train the "
        "generator longer or raise fedfed.sigma)"
    ),
}


def health_view(metrics: Mapping[str, float]) -> dict[str, float]:
    """Only the health and alarm entries of a metrics mapping."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith(HEALTH_PREFIX) or k.startswith(ALARM_PREFIX)
    }


def raised_alarms(per_node: Mapping[Any, Mapping[str, float]]) -> dict[str, list[str]]:
    """alarm key -> the nodes that raised it this round (by partition, as text)."""
    raised: dict[str, list[str]] = {}
    for node, metrics in per_node.items():
        for key, value in metrics.items():
            if key.startswith(ALARM_PREFIX) and float(value) > 0:
                raised.setdefault(key, []).append(str(node))
    return raised


def describe_alarm(key: str) -> str:
    return ALARMS.get(key, key)


class AlarmTracker:
    """Turns per-round alarm flags into messages worth reading: one when an alarm is
    raised, one when it clears, and a reminder at the last round if it never did.
    (Repeating it every round would bury the progress lines.)"""

    def __init__(self) -> None:
        self.active: dict[str, list[str]] = {}

    def update(
        self, round_index: int, per_node: Mapping[Any, Mapping[str, float]], last: bool
    ) -> list[tuple[bool, str]]:
        """(is_warning, message) pairs for this round."""
        raised = raised_alarms(per_node)
        messages = []
        for key, nodes in raised.items():
            if key not in self.active or last:
                state = "still raised at the last round" if key in self.active else "raised"
                messages.append(
                    (
                        True,
                        f"[round {round_index}] alarm {state} on {len(nodes)} of "
                        f"{len(per_node)} nodes (partitions {','.join(nodes)}): "
                        f"{describe_alarm(key)}",
                    )
                )
        for key in self.active.keys() - raised.keys():
            messages.append((False, f"[round {round_index}] alarm cleared on every node: {key}"))
        self.active = raised
        return messages
