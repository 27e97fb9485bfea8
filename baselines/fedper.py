"""FedPer (Arivazhagan et al. 2019, arXiv 1912.00818, "Federated Learning with
Personalization Layers"): FedAvg on the base layers, while the personalization layers on
top stay on the node.

Every round a node trains its whole classifier, base and personalization layers jointly,
for ``local-epochs`` epochs, and sends only the base. The hub averages the bases weighted
by training examples (the paper's n_j / n; here the hub's ``weighted-mean``, as for FedAvg)
and every node loads the average while keeping its own personalization layers.

The personalization layers are the paper's top K_P layers; here K_P = 1, the classifier's
last linear layer (:func:`baselines.common.head_names`), the head FedRep and DFedPGP keep
too. FedPer is then FedRep with one joint phase in place of FedRep's head-then-body
phases, so the two compare how a round trains, nothing else. The base is everything
else, BatchNorm layers (and their running statistics) included when the classifier has
them, as FedRep's body.

Choices:

- Optimizer: one Adam over the whole classifier at ``learning-rate`` (the project's
  common choice, as every baseline here), its state kept between rounds (in
  ``context.state``); the paper uses SGD.
- The personalization layers start from the run's common model, as FedRep's head does
  here (:class:`~baselines.common.ClassifierLearner` draws the whole classifier from it).
- Compute: ``local-epochs`` epochs a round, where FedRep spends ``fedrep.head-epochs +
  fedrep.body-epochs``; ``local_passes`` records it beside every result.
"""

from __future__ import annotations

from baselines.common import ClassifierLearner, head_names
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import weighted_mean


class FedPerLearner(ClassifierLearner):
    """The whole classifier trained jointly; its last linear layer never leaves the node."""

    def private_names(self) -> set[str]:
        return head_names(self.classifier)


SPEC = MethodSpec(
    name="fedper",
    title="FedPer",
    sends="the base layers: all but the last layer (hub: weighted mean)",
    keeps="the personalization layer (last linear layer), trained with the base",
    personalized="output layer (head)",
    learner=FedPerLearner,
    reducer=weighted_mean,
)
