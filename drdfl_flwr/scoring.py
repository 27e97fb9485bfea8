"""The accuracies every node reports, from one pass over each test set.

The paper's Local-T is the node's own test split (test images dealt out like its training
labels). At a few hundred training images per client that split holds 11-258 images, so
one client's Local-T carries a sampling standard error of several points, and the
client mean of a seed moves by whole points with the draw. The Global-T pass already
scores every test image of every class some client holds, so the same pass gives, per
class ``k``, the node's accuracy ``acc_k`` on ~1,000 images (CIFAR-10) and from it:

- ``global_t_balanced_acc``: the mean of the per-class accuracies (each class counts
  once, whatever its share of the test set);
- ``expected_local_t_acc``: ``sum_k p_k acc_k``, ``p`` the node's training class
  proportions: the expectation of Local-T over test draws (the paper defines the local
  test set as sharing the training distribution), estimated from the whole test set;
- ``absent_class_acc``: the mean ``acc_k`` over the classes the node holds no training
  image of: what only collaboration can teach it (absent when it holds every class).

``local_t_se`` and ``expected_local_t_se`` are the binomial standard errors of the two
Local-T estimates on this node, so a report can show what the expectation buys.

Local-T and the expected Local-T are read with the method's local scoring rule
(``log_prior``: DFML adds the node's class prior to its balanced logits); Global-T, its
balanced form and the absent classes with the raw logits.
"""

from __future__ import annotations

import math

import torch

LOCAL_T = "local_t_acc"
GLOBAL_T = "global_t_acc"
GLOBAL_T_BALANCED = "global_t_balanced_acc"
EXPECTED_LOCAL_T = "expected_local_t_acc"
ABSENT_CLASS = "absent_class_acc"
LOCAL_T_SE = "local_t_se"
EXPECTED_LOCAL_T_SE = "expected_local_t_se"
# DFML's peak snapshot, scored beside its current model (drdfl_flwr.methods.dfml)
PEAK_LOCAL_T = "peak_local_t_acc"
PEAK_GLOBAL_T = "peak_global_t_acc"
# the majority-class predictor's scores on the same sets: how much is the label prior
FLOOR_PREFIX = "floor_"
ACCURACIES = (LOCAL_T, EXPECTED_LOCAL_T, GLOBAL_T, GLOBAL_T_BALANCED, ABSENT_CLASS)
# every score a node's evaluation can report: what a run's summary keeps per round
SCORE_KEYS = (
    *ACCURACIES,
    LOCAL_T_SE,
    EXPECTED_LOCAL_T_SE,
    PEAK_LOCAL_T,
    PEAK_GLOBAL_T,
    *(FLOOR_PREFIX + key for key in ACCURACIES),
)


def class_proportions(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``p_k = n_k / n`` over training labels (zeros for absent classes): the node's
    prior for DFML's re-weighted softmax and the weights of the expected Local-T."""
    counts = torch.bincount(y.long().flatten().cpu(), minlength=num_classes).float()
    return counts / counts.sum().clamp_min(1.0)


def per_class_accuracy(
    predicted: torch.Tensor, y: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy per class, test images per class); NaN accuracy where a class has none."""
    counts = torch.bincount(y, minlength=num_classes).double()
    correct = torch.bincount(y[predicted == y], minlength=num_classes).double()
    accuracy = torch.where(counts > 0, correct / counts.clamp(min=1.0), torch.nan)
    return accuracy, counts


def score_logits(
    local_logits: torch.Tensor,
    y_local: torch.Tensor,
    global_logits: torch.Tensor,
    y_global: torch.Tensor,
    y_train: torch.Tensor,
    num_classes: int,
    log_prior: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every accuracy of one node from its logits on the two test sets (see the module
    docstring). ``log_prior`` is added to the logits for the Local-T readings."""
    prior = 0.0 if log_prior is None else log_prior.to(global_logits.dtype)
    metrics: dict[str, float] = {}
    if len(y_local):
        local_right = ((local_logits + prior).argmax(1) == y_local).double()
        acc = local_right.mean().item()
        metrics[LOCAL_T] = acc
        metrics[LOCAL_T_SE] = math.sqrt(acc * (1.0 - acc) / len(y_local))
    if not len(y_global):
        return metrics
    raw = global_logits.argmax(1)
    metrics[GLOBAL_T] = (raw == y_global).double().mean().item()
    raw_acc, counts = per_class_accuracy(raw, y_global, num_classes)
    tested = counts > 0
    metrics[GLOBAL_T_BALANCED] = raw_acc[tested].mean().item()

    local_acc = raw_acc
    if log_prior is not None:
        local_acc, _ = per_class_accuracy((global_logits + prior).argmax(1), y_global, num_classes)
    p = class_proportions(y_train, num_classes).double()
    held = (p > 0) & tested
    if held.any():
        weights = p[held] / p[held].sum()  # a held class missing from the test set is dropped
        acc_k = local_acc[held]
        metrics[EXPECTED_LOCAL_T] = (weights * acc_k).sum().item()
        variance = (weights**2 * acc_k * (1.0 - acc_k) / counts[held]).sum().item()
        metrics[EXPECTED_LOCAL_T_SE] = math.sqrt(variance)
    absent = (p == 0) & tested
    if absent.any():
        metrics[ABSENT_CLASS] = raw_acc[absent].mean().item()
    return metrics


def majority_floor(
    y_local: torch.Tensor, y_global: torch.Tensor, y_train: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """The scores of a predictor that always answers the node's majority training class
    (ties: the lowest class), as ``floor_*``: the trivial floor every method's number is
    read against. Scored by :func:`score_logits` itself, on one-hot logits, so the floor
    and the methods are the same computation."""
    majority = int(torch.bincount(y_train.long(), minlength=num_classes).argmax())

    def one_hot(n: int) -> torch.Tensor:
        logits = torch.zeros(n, num_classes)
        logits[:, majority] = 1.0
        return logits

    scores = score_logits(
        one_hot(len(y_local)), y_local, one_hot(len(y_global)), y_global, y_train, num_classes
    )
    return {FLOOR_PREFIX + k: v for k, v in scores.items() if k in ACCURACIES}
