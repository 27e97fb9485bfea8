"""DRDFL's learner: the min-max sign, the EMA weight, the Learngene merge, bad payloads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drdfl_flwr.config import RunConfig
from drdfl_flwr.learner import build_learner
from drdfl_flwr.methods.drdfl import ClassStatistics, uniform_adversarial_loss
from drdfl_flwr.payload import PayloadError

SHAPE, K = (1, 8, 8), 10


def make(**changes):
    return build_learner(RunConfig(method="drdfl", **changes), SHAPE, K)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(module.parameters(), before, strict=True))


def head_losses(learner, x, y, seed=0):
    """(L_adv, L_adv^u) of the current head on the current Learngene, fixed noise."""
    torch.manual_seed(seed)
    with torch.no_grad():
        mu, log_var = learner.learngene(x)
        z_l = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        logits = learner.adversary(z_l)
    return F.cross_entropy(logits, y).item(), uniform_adversarial_loss(logits).item()


def test_uniform_loss_is_smallest_for_uniform_output():
    uniform = torch.zeros(4, K)
    peaked = torch.zeros(4, K)
    peaked[:, 0] = 8.0
    assert uniform_adversarial_loss(uniform).item() == pytest.approx(torch.log(torch.tensor(K)))
    assert uniform_adversarial_loss(peaked) > uniform_adversarial_loss(uniform)


def readable_batch(n: int = 128):
    """Images whose brightness encodes the label, so z_l can carry it."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (n,), generator=gen)
    x = (y.float() / (K - 1) * 2 - 1)[:, None, None, None] + 0.05 * torch.randn(
        (n, *SHAPE), generator=gen
    )
    return x.clamp(-1, 1), y


def leak_labels_into_learngene(learner, x, y, steps: int = 150) -> None:
    """Make z_l carry the label (as an untrained game might), to test both sides of it."""
    params = list(learner.learngene.parameters()) + list(learner.adversary.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        mu, log_var = learner.learngene(x)
        loss = F.cross_entropy(learner.adversary(mu), y) + (log_var + 6).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_max_step_trains_only_the_head():
    learner = make(learning_rate=1e-2)
    x, y = readable_batch()
    leak_labels_into_learngene(learner, x, y)
    learner.adversary.net[-1].reset_parameters()  # a head that must learn again
    learngene_before = snapshot(learner.learngene)
    adv_before, _ = head_losses(learner, x, y)
    for _ in range(30):
        learner.adversary_step(x, y)
    assert unchanged(learner.learngene, learngene_before)
    adv_after, _ = head_losses(learner, x, y)
    assert adv_after < adv_before - 0.5, "the head did not learn to read labels from z_l"


def test_min_step_pushes_learngene_against_the_head():
    """The Learngene descends L_adv^u: the head's output moves toward uniform and its
    label loss rises; the head itself is not stepped. A flipped sign fails this."""
    learner = make(learning_rate=1e-3)
    x, y = readable_batch()
    leak_labels_into_learngene(learner, x, y)
    adv_before, uniform_before = head_losses(learner, x, y)
    assert adv_before < 0.5, "setup: the leak did not work"
    head_before = snapshot(learner.adversary)
    for module in (learner.persona, learner.decoder, learner.classifier, learner.stats):
        module.requires_grad_(False)  # isolate the Learngene's side of the game
    for _ in range(20):
        learner.main_step(x, y)
    assert unchanged(learner.adversary, head_before)
    adv_after, uniform_after = head_losses(learner, x, y)
    assert uniform_after < uniform_before - 0.5, "the Learngene did not move toward uniform"
    assert adv_after > adv_before + 0.5, "the Learngene helped the head instead of fooling it"


def test_ema_uses_alpha_on_own_statistics():
    stats = ClassStatistics(K, 4)
    own_mu, own_var = stats.mu.detach().clone(), stats.variance().detach().clone()
    got_mu, got_var = torch.randn(K, 4), torch.rand(K, 4) + 0.5
    stats.ema_toward(got_mu, got_var, alpha=0.9)
    torch.testing.assert_close(stats.mu.detach(), 0.9 * own_mu + 0.1 * got_mu)
    torch.testing.assert_close(stats.variance().detach(), 0.9 * own_var + 0.1 * got_var)


@pytest.mark.parametrize("merge", ["average", "replace"])
def test_absorb_merges_learngene_and_statistics(merge):
    learner = make(learngene_merge=merge, ema_alpha=0.75)
    sender = build_learner(RunConfig(method="drdfl", seed=99), SHAPE, K, partition_id=3)
    received = sender.shared_payload()
    own = learner.shared_payload()
    learner.absorb([received])
    after = learner.shared_payload()
    for key in own:
        if key.startswith("learngene."):
            want = received[key] if merge == "replace" else 0.5 * (own[key] + received[key])
        else:  # stats.mu / stats.var: EMA with weight 0.75 on the node's own value
            want = 0.75 * own[key] + 0.25 * received[key]
        torch.testing.assert_close(after[key], want, rtol=1e-5, atol=1e-6)


def test_payload_holds_only_learngene_and_statistics():
    learner = make()
    payload = learner.shared_payload()
    assert {k.split(".")[0] for k in payload} == {"learngene", "stats"}
    assert set(payload) - {"stats.mu", "stats.var"} == {
        f"learngene.{k}" for k in learner.learngene.state_dict()
    }


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.update({"stats.mu": torch.full_like(p["stats.mu"], float("nan"))}),
        lambda p: p.update({"stats.var": torch.zeros(3, 3)}),
        lambda p: p.pop("stats.var"),
        lambda p: p.update({"extra": torch.zeros(1)}),
    ],
    ids=["nan", "wrong-shape", "missing-key", "extra-key"],
)
def test_malformed_payload_is_rejected_and_changes_nothing(corrupt):
    learner = make()
    before = learner.to_bytes()
    good = make(seed=5).shared_payload()
    bad = make(seed=6).shared_payload()
    corrupt(bad)
    with pytest.raises(PayloadError):
        learner.absorb([good, bad])
    after = make()
    after.load_bytes(learner.to_bytes())
    reference = make()
    reference.load_bytes(before)
    for key, value in reference.shared_payload().items():
        assert torch.equal(after.shared_payload()[key], value)


def test_fit_reports_every_loss_and_learns(tiny_data):
    learner = make(local_epochs=3, learning_rate=3e-3)
    first = learner.fit(tiny_data)
    assert set(first) == {"l_adv", "l_cls", "l_log", "l_kl", "l_adv_u", "l_rec", "l_ce"}
    for _ in range(4):
        last = learner.fit(tiny_data)
    assert last["l_ce"] < first["l_ce"] and last["l_rec"] < first["l_rec"]
    assert learner.rounds_trained == 5


def test_state_round_trip_restores_predictions(tiny_data):
    learner = make()
    learner.fit(tiny_data)
    clone = make(seed=123)
    clone.load_bytes(learner.to_bytes())
    assert torch.equal(clone.predict(tiny_data.x_train), learner.predict(tiny_data.x_train))
    assert clone.rounds_trained == 1
