"""What the rest of the app needs to know about a method, declared at the end of the
method's own file (``SPEC = MethodSpec(...)``) and found by name in
:mod:`drdfl_flwr.registry`.

A centralized method names its hub reduction here as a callable (:data:`reducer`), written
beside its learner when it is its own (FedNova, FedFed), so a method's server and client
halves live in one file, as in Flower's baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from drdfl_flwr.config import DENSE_CLASSIFIERS, MethodOptions, RunConfig
from strategies.reducers import Reducer


@dataclass(frozen=True)
class MethodSpec:
    """A method's facts, in one place. ``learner`` is the method's
    :class:`~drdfl_flwr.learner.Learner` class (its ``OPTIONS`` is the method's config
    section). ``reducer`` is the hub's reduction for a centralized method; ``None`` means
    decentralized: peers' payloads are routed by the relay and never averaged by anyone but
    the receiving node. ``reads`` names other methods' sections the method also reads (an
    extension configured on top of its base).

    What the method is called and what it shares, as the figures and tables print it:
    ``title`` is its name as the papers write it (``FedBN``), in every figure
    (:mod:`drdfl_flwr.experiments.names`); ``sends`` is what leaves the node each round (to
    its ring successor or to the hub) and ``keeps`` what never does, the two columns of
    the architecture figure (:mod:`drdfl_flwr.experiments.architecture`); ``personalized``
    says in a few words which part stays on the node (the paper's Table 1 column), for the
    experiment report's communication table.

    ``exempt`` names the checks of the contract every method keeps
    (tests/test_method_contract.py) that cannot hold for this one, each with the reason
    (``{"bad-payload": "it takes nothing: ..."}``); an exemption that no longer applies
    fails the suite."""

    name: str
    title: str  # the papers' spelling, in every figure: "FedBN"
    learner: type
    personalized: str  # what stays on the node, for the communication table (Table 1)
    sends: str  # each round, to the ring successor (relay) or to the hub
    keeps: str  # what never leaves the node
    reducer: Reducer | None = None
    classifiers: tuple[str, ...] = DENSE_CLASSIFIERS
    check: Callable[[RunConfig], None] | None = None  # cross-key checks beyond the section
    reads: tuple[str, ...] = ()  # other sections this one reads (drdfl-vf: [drdfl])
    exempt: Mapping[str, str] = field(default_factory=dict, compare=False)  # check -> why

    @property
    def options(self) -> type[MethodOptions] | None:
        """The method's own config section (its learner's ``OPTIONS``)."""
        return self.learner.OPTIONS

    @property
    def sections(self) -> tuple[str, ...]:
        """Every config section the method's results depend on."""
        own = (self.options.SECTION,) if self.options is not None else ()
        return own + self.reads

    @property
    def centralized(self) -> bool:
        return self.reducer is not None
