"""BatchNorm running statistics come from real images only: a classifier that also
trains on synthetic inputs (DRDFL's noisy reconstructions, DRDFL-Gen's and CVAE's
generated samples) normalizes test images with statistics of the real training data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drdfl_flwr.models.norm import running_stats_frozen
from drdfl_flwr.registry import build_learner
from tests.conftest import make_config, random_client_data

SHAPE, K = (1, 8, 8), 10


def expected_after_clean_passes(learner, data, fit) -> tuple[dict, dict]:
    """Run ``fit`` while recording every BatchNorm input of the classifier's forwards in
    train mode, each tagged clean when the classifier's input rows are training images;
    return (actual buffers after fit, buffers replayed from the clean forwards alone)."""
    real_rows = {row.numpy().tobytes() for row in data.x_train}
    norms = {
        name: m
        for name, m in learner.classifier.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    assert norms, "the test needs a classifier with BatchNorm"
    replay = {n: {k: v.clone() for k, v in m.named_buffers()} for n, m in norms.items()}
    clean = [True]

    def tag(_module, inputs):
        clean[0] = all(r.detach().cpu().numpy().tobytes() in real_rows for r in inputs[0])

    def record(name):
        def hook(module, inputs):
            if not module.training or not clean[0]:
                return
            x = inputs[0].detach()
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, unbiased=True)
            m, buffers = module.momentum, replay[name]
            buffers["running_mean"].mul_(1 - m).add_(m * mean)
            buffers["running_var"].mul_(1 - m).add_(m * var)
            buffers["num_batches_tracked"].add_(1)

        return hook

    handles = [learner.classifier.register_forward_pre_hook(tag)]
    handles += [m.register_forward_pre_hook(record(n)) for n, m in norms.items()]
    try:
        fit()
    finally:
        for h in handles:
            h.remove()
    actual = {n: dict(m.named_buffers()) for n, m in norms.items()}
    return actual, replay


@pytest.mark.parametrize("method", ["drdfl", "cvae"])
def test_running_statistics_after_fit_are_those_of_the_clean_batches(method):
    cfg = make_config(
        method=method,
        classifier_norm="batch",
        local_epochs=2,
        batch_size=16,
    )
    learner = build_learner(cfg, SHAPE, K)
    data = random_client_data(64, SHAPE, K)
    actual, replay = expected_after_clean_passes(learner, data, lambda: learner.fit(data))
    for name, buffers in actual.items():
        assert int(buffers["num_batches_tracked"]) == int(replay[name]["num_batches_tracked"])
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(buffers[key], replay[name][key], atol=1e-5, rtol=1e-4)


def test_frozen_statistics_still_normalize_with_the_batch():
    """Inside the context the forward is a training forward (batch statistics), only the
    buffers are put back."""
    bn = nn.BatchNorm1d(3)
    x = torch.randn(8, 3) * 5 + 2
    with running_stats_frozen(bn):
        out = bn(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


# the methods whose model is built by the project's classifier factory and averaged,
# exchanged or replaced: GroupNorm removes the running statistics that averaging over
# label-skewed clients would mix (DFedPGP's release builds its ResNet with GroupNorm)
WEIGHT_SHARING = (
    "fedavg",
    "fedprox",
    "fedrep",
    "fednova",
    "fedfed",
    "dfedpgp",
    "dispfl",
    "cvae",
    "drdfl",
    "drdfl-cfl",
)


@pytest.mark.parametrize("method", WEIGHT_SHARING)
def test_group_norm_replaces_every_batchnorm_of_a_weight_sharing_method(method):
    cfg = make_config(method=method, classifier_norm="group", local_epochs=1, device="cpu")
    data = random_client_data(64, SHAPE, K)
    node = build_learner(cfg, SHAPE, K)
    layers = [
        m for mod in node.modules().values() if isinstance(mod, nn.Module) for m in mod.modules()
    ]
    assert any(isinstance(m, nn.GroupNorm) for m in layers)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in layers)
    node.fit(data)
    payload = node.shared_payload()
    assert not any("running_" in key for key in payload), method
