"""Fedcvae baseline: only the encoder leaves the node, the merge rules, generation and the
decoder's isolation from the classifier loss, payload validation, state round trip, and
the CVAE learning on real digits."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.cvae import PREFIX, CVAELearner, CVAEOptions
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import ClientData, load_client_data
from drdfl_flwr.payload import peers
from tests.conftest import make_config

SHAPE = (1, 8, 8)
K = 10


def make_cfg(**kw) -> RunConfig:
    base = {"method": "cvae", "device": "cpu", "local_epochs": 1, "batch_size": 16}
    return make_config(**{**base, **kw})


def make_data(classes=(0, 1, 2), n: int = 48, seed: int = 0) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=gen)]
    x = torch.rand((n, *SHAPE), generator=gen) * 2 - 1
    return ClientData(x, y, x[:8], y[:8], x[:16], y[:16], K)


def learner(partition_id: int = 0, **kw) -> CVAELearner:
    torch.manual_seed(100 + partition_id)
    return CVAELearner(make_cfg(**kw), SHAPE, K, partition_id=partition_id)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(node: CVAELearner) -> dict[str, dict[str, torch.Tensor]]:
    return {
        n: state(m)
        for n, m in (("enc", node.encoder), ("dec", node.decoder), ("clf", node.classifier))
    }


def trained_pair(**kw) -> tuple[CVAELearner, CVAELearner]:
    """Two nodes whose encoders differ (each trained once on its own data)."""
    a, b = learner(0, **kw), learner(1, **kw)
    a.fit(make_data((0, 1, 2), seed=0))
    b.fit(make_data((5, 6, 7), seed=1))
    return a, b


def test_config_section():
    assert make_cfg().options(CVAEOptions).merge == "average"
    for bad in ({"cvae_merge": "ema"}, {"cvae_latent_dim": 0}, {"cvae_generated_weight": -1.0}):
        with pytest.raises(ConfigError, match="cvae"):
            make_cfg(**bad)
    with pytest.raises(ConfigError, match="topology"):
        make_cfg(topology="star")  # decentralized: no hub reducer


def test_payload_holds_only_the_encoder():
    node = learner()
    payload = node.shared_payload()
    encoder = node.encoder.state_dict()
    assert set(payload) == {PREFIX + k for k in encoder}
    for k, v in encoder.items():
        assert torch.equal(payload[PREFIX + k], v)
    # Bytes: exactly the encoder's (that no private value rides along, and that the
    # encoder starts alike on every node: tests/test_method_contract.py).
    payload_bytes = sum(v.numel() * v.element_size() for v in payload.values())
    encoder_bytes = sum(v.numel() * v.element_size() for v in encoder.values())
    assert payload_bytes == encoder_bytes


@pytest.mark.parametrize("merge", ["average", "replace"])
def test_absorb_merges_encoder_and_leaves_private_modules(merge):
    a, b = trained_pair(cvae_merge=merge)
    own, received = a.shared_payload(), b.shared_payload()
    assert not same(own, received)
    before = snapshot(a)
    a.absorb(peers(received))
    after = a.shared_payload()
    for k in own:
        want = (own[k] + received[k]) / 2 if merge == "average" else received[k]
        assert torch.equal(after[k], want), k
    assert same(before["dec"], snapshot(a)["dec"])
    assert same(before["clf"], snapshot(a)["clf"])


def test_average_over_several_in_neighbours():
    a, b = trained_pair()
    c = learner(2)
    c.fit(make_data((8, 9), seed=2))
    own, p1, p2 = a.shared_payload(), b.shared_payload(), c.shared_payload()
    a.absorb(peers(p1, p2))
    for k, v in a.shared_payload().items():
        assert torch.allclose(v, (own[k] + p1[k] + p2[k]) / 3, atol=1e-7)


def test_generated_samples_and_decoder_isolated_from_classifier_loss():
    node = learner()
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 3, 3, 9, 1])
    x_gen = node.generate(labels, gen)
    assert x_gen.shape == (len(labels), *SHAPE)
    assert not x_gen.requires_grad
    # The samples depend on the label: same z, other labels -> other images.
    again = node.generate(torch.tensor([1, 2, 4, 0, 5]), torch.Generator().manual_seed(0))
    assert not torch.allclose(x_gen, again)
    # Labels come from the node's own distribution only.
    counts = torch.bincount(torch.tensor([2, 2, 7]), minlength=K).float()
    drawn = node.sample_labels(counts, 200, gen)
    assert set(drawn.tolist()) == {2, 7}
    # The classifier losses reach the classifier and nothing else.
    data = make_data()
    node.optimizer.zero_grad(set_to_none=True)
    l_ce, l_ce_gen = node.classifier_losses(data.x_train[:16], data.y_train[:16], counts, gen)
    assert l_ce_gen.item() > 0
    (l_ce + l_ce_gen).backward()
    assert all(p.grad is None for p in node.decoder.parameters())
    assert all(p.grad is None for p in node.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in node.classifier.parameters())
    # A classifier-only optimizer step (the real loss plus the generated one) leaves the decoder.
    decoder_before = state(node.decoder)
    clf_opt = torch.optim.Adam(node.classifier.parameters(), lr=1e-2)
    node.optimizer.zero_grad(set_to_none=True)
    _, l_ce_gen = node.classifier_losses(data.x_train[:16], data.y_train[:16], counts, gen)
    l_ce_gen.backward()
    clf_opt.step()
    node.optimizer.step()  # the joint Adam too: decoder grads are None, so it skips them
    assert same(decoder_before, state(node.decoder))


def test_generated_weight_moves_only_the_classifier():
    """A whole fit with the generated loss weighted 1 or 3: encoder and decoder end
    bit-identical (the classifier loss never reaches them), the classifier does not."""
    data = make_data()
    low, high = learner(0, cvae_generated_weight=1.0), learner(0, cvae_generated_weight=3.0)
    low.fit(data)
    high.fit(data)
    assert same(state(low.decoder), state(high.decoder))
    assert same(state(low.encoder), state(high.encoder))
    assert not same(state(low.classifier), state(high.classifier))


def test_fit_metrics_and_health():
    node = learner()
    metrics = node.fit(make_data())
    assert node.rounds_trained == 1
    for key in ("l_rec", "l_kl", "l_ce", "l_ce_gen", "health_rec_loss", "health_kl_per_dim"):
        assert math.isfinite(metrics[key]), key
    assert metrics["local_steps"] == 3.0
    assert metrics["health_rec_loss"] > 0 and metrics["health_kl_per_dim"] >= 0


def test_reconstruction_learns_on_digits():
    cfg = make_cfg(batch_size=32)
    data = load_client_data(cfg, 0, 3)
    torch.manual_seed(0)
    node = CVAELearner(cfg, tuple(data.x_train.shape[1:]), data.num_classes)
    history = [node.fit(data) for _ in range(4)]  # 4 x 17 steps; l_rec about 40 -> 18
    first, last = history[0], history[-1]
    assert last["l_rec"] < 0.7 * first["l_rec"], [h["l_rec"] for h in history]
    assert last["health_rec_loss"] < 0.8 * first["health_rec_loss"]
    assert last["l_ce"] < first["l_ce"]  # the classifier learns beside it
