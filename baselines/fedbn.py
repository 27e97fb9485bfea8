"""FedBN (Li et al. 2021, arXiv 2102.07623; code med-air/FedBN): FedAvg on every state
entry except the BatchNorm layers, which stay on the node.

Each node trains its whole classifier for ``local-epochs`` epochs and sends every
floating-point entry except its BatchNorm layers' scale, shift and running statistics
(:func:`baselines.common.norm_names`; the integer ``num_batches_tracked`` never travels
in any method). The hub averages what it gets and every node loads the average over its
conv and linear entries while keeping its own BatchNorm (``federated/fed_digits.py``,
``communication``: keys containing ``bn`` are skipped). This matches the DRDFL paper's
description (App. B.1.3, Table 1: BN layers personal, conv/FC weights and biases
aggregated).

FedBN needs BatchNorm layers: a run with a classifier that has none (the small CNN with
``classifier-norm`` auto/none/group, a ResNet with group or none) is refused at start-up,
naming ``classifier-norm``; ``classifier-norm = "batch"`` gives the small CNN a
BatchNorm after each convolution.

Deviations:

- The hub weights by training examples (the project's ``weighted-mean``, as for FedAvg)
  where the released digits code gives every client 1/N; with equal-sized clients the two
  coincide, and example weights keep FedBN comparable with FedAvg and FedRep here.
- Optimizer: Adam at ``learning-rate`` (the project's common choice), not the released
  SGD lr 1e-2; its state is kept between rounds as FedAvg's is.
- BatchNorm is identified by module type (every ``_BatchNorm``), not by ``bn`` in the key,
  so it holds for any architecture's naming (the small CNN's ``features.1``).
"""

from __future__ import annotations

from baselines.common import ClassifierLearner, norm_names
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import weighted_mean


def resolved_norm(classifier: str, norm: str) -> str:
    """The norm ``build_classifier`` gives ``classifier`` for ``classifier-norm = norm``."""
    if norm == "auto":
        return "none" if classifier == "small-cnn" else "batch"
    return norm


def check_has_batchnorm(cfg: RunConfig) -> None:
    norm = resolved_norm(cfg.classifier, cfg.classifier_norm)
    if norm != "batch":
        raise ConfigError(
            "classifier-norm",
            cfg.classifier_norm,
            f"fedbn keeps the BatchNorm layers on the node, but {cfg.classifier} with "
            f"classifier-norm = {cfg.classifier_norm!r} has no BatchNorm (its norm is "
            f'{norm!r}); set classifier-norm = "batch"',
        )


class FedBNLearner(ClassifierLearner):
    """Shares every floating-point entry except BatchNorm's (scale, shift, statistics)."""

    def private_names(self) -> set[str]:
        return norm_names(self.classifier)


SPEC = MethodSpec(
    name="fedbn",
    title="FedBN",
    sends="every parameter but BatchNorm (hub: weighted mean)",
    keeps="BatchNorm scale, shift and running statistics",
    personalized="BatchNorm layers",
    learner=FedBNLearner,
    reducer=weighted_mean,
    check=check_has_batchnorm,
)
