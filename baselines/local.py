"""Local: each client trains its own classifier and talks to nobody (paper 001, B.1.3).

The floor every collaborative method must beat; one round = ``local-epochs`` epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

from baselines.common import ClassifierLearner
from drdfl_flwr.payload import Incoming, PayloadError, Tensors
from drdfl_flwr.spec import MethodSpec


class LocalLearner(ClassifierLearner):
    """The classifier-only learner with nothing shared and nothing accepted."""

    PRIVATE = ("classifier",)

    def absorb(self, incoming: Sequence[Incoming]) -> None:
        if any(i.tensors for i in incoming):
            raise PayloadError("the local baseline expects no payloads, got a non-empty one")

    def shared_payload(self) -> Tensors:
        return {}


SPEC = MethodSpec(
    name="local",
    title="Local",
    sends="nothing",
    keeps="everything",
    personalized="full model (nothing shared)",
    learner=LocalLearner,
    exempt={"bad-payload": "it takes nothing: any payload is refused whole, no entry to name"},
)
