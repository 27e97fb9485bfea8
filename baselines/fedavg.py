"""FedAvg (McMahan et al. 2017): every node trains the whole classifier, the hub averages
it weighted by training examples and sends the average back (paper 001, Table 2's CFL
reference point). The hub's reduction is Flower's ``aggregate_arrayrecords``.
"""

from __future__ import annotations

from baselines.common import ClassifierLearner
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import weighted_mean


class FedAvgLearner(ClassifierLearner):
    """Shares every floating-point state entry of the classifier."""


SPEC = MethodSpec(
    name="fedavg",
    title="FedAvg",
    sends="the whole classifier (hub: weighted mean)",
    keeps="nothing: one global model",
    personalized="none (one global model)",
    learner=FedAvgLearner,
    reducer=weighted_mean,
    exempt={"private": "one global model: nothing stays on the node"},
)
