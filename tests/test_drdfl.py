"""DRDFL's learner: the paper's losses, which block each loss trains, the min-max sign,
the shared class prior, the EMA weight, the Learngene merge, bad payloads, and the
health alarm that catches a Learngene carrying nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drdfl_flwr.config import RunConfig
from drdfl_flwr.methods import drdfl
from drdfl_flwr.methods.drdfl import (
    ClassStatistics,
    gaussian_mixture_losses,
    reconstruction_loss,
    uniform_adversarial_loss,
)
from drdfl_flwr.payload import peers
from drdfl_flwr.registry import build_learner
from tests.conftest import make_config

SHAPE, K = (1, 8, 8), 10


def make(**changes):
    return build_learner(make_config(method="drdfl", **changes), SHAPE, K)


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


@pytest.mark.parametrize("merge, own_weight", [("average", 0.5), ("replace", 0.0), ("ema", 0.8)])
def test_absorb_merges_learngene_and_statistics(merge, own_weight):
    learner = make(drdfl_learngene_merge=merge, drdfl_ema_alpha=0.75, drdfl_learngene_ema_alpha=0.8)
    sender = build_learner(RunConfig(method="drdfl", seed=99), SHAPE, K, partition_id=3)
    received = sender.shared_payload()
    own = learner.shared_payload()
    learner.absorb(peers(received))
    after = learner.shared_payload()
    for key in own:
        if key.startswith("learngene."):
            want = own_weight * own[key] + (1 - own_weight) * received[key]
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


def test_fit_reports_every_loss_and_learns(tiny_data):
    learner = make(local_epochs=3, learning_rate=3e-3)
    first = learner.fit(tiny_data)
    losses = {"l_adv", "l_cls", "l_log", "l_kl", "l_adv_u", "l_rec", "l_ce"}
    health = {
        "health_zl_kl_per_dim",
        "health_rec_gap_zl",
        "health_rec_err",
        "health_adv_acc",
        "health_majority_rate",
        "alarm_zl_unused",
    }
    assert set(first) == losses | health | {"priors_frozen"}
    for _ in range(4):
        last = learner.fit(tiny_data)
    assert last["l_ce"] < first["l_ce"] and last["l_rec"] < first["l_rec"]
    assert learner.rounds_trained == 5


# -- the paper's losses, and which block each one trains ----------------------------------
def replay_reconstruction(learner, x, seed):
    """The decoder output of ``losses()`` for the same RNG state, recomputed by hand."""
    torch.manual_seed(seed)
    z_p = learner.persona(x)
    mu, log_var = learner.learngene(x)
    z_l = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
    return learner.decoder(torch.cat([z_p, z_l], 1))


def test_reconstruction_loss_is_summed_over_pixels(tiny_data):
    """||x - x'||^2 per sample; a mean over pixels weighs it 64x (3072x on CIFAR) less."""
    learner = make()
    x, y = tiny_data.x_train, tiny_data.y_train
    torch.manual_seed(7)
    l_rec = learner.losses(x, y)["l_rec"]
    x_rec = replay_reconstruction(learner, x, seed=7)
    per_sample = (x_rec - x).pow(2).sum(dim=(1, 2, 3))
    assert l_rec.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert reconstruction_loss(x_rec, x).item() == pytest.approx(per_sample.mean().item())


def test_log_likelihood_loss_is_the_full_negative_log_density():
    stats = ClassStatistics(K, 6)
    z, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 4])
    _, l_log = gaussian_mixture_losses(stats, z, y)
    normal = torch.distributions.Normal(stats.mu[y], stats.variance()[y].sqrt())
    assert l_log.item() == pytest.approx(-normal.log_prob(z).sum(1).mean().item(), rel=1e-5)


def block_grads(learner, loss_name, x, y) -> dict[str, bool]:
    """Which blocks a single loss term sends gradient to."""
    for module in learner.modules().values():
        if isinstance(module, torch.nn.Module):
            module.zero_grad(set_to_none=True)
    learner.losses(x, y)[loss_name].backward()
    blocks = ("persona", "stats", "learngene", "decoder", "classifier")
    return {
        b: any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(learner, b).parameters()
        )
        for b in blocks
    }


def test_each_block_trains_on_its_own_losses(tiny_data):
    """Algorithm 1: PersonaNet and statistics on L_PR; Learngene on L_GL and the
    reconstruction; decoder on L_rec; classifier on L_ce. The reconstruction gradient
    must not reach PersonaNet (its code would bypass the Learngene)."""
    learner = make()
    x, y = tiny_data.x_train, tiny_data.y_train
    assert block_grads(learner, "l_rec", x, y) == {
        "persona": False,
        "stats": False,
        "learngene": True,
        "decoder": True,
        "classifier": False,
    }
    for name in ("l_cls", "l_log"):
        reached = block_grads(learner, name, x, y)
        assert {b for b, hit in reached.items() if hit} <= {"persona", "stats"}
        assert reached["persona"]
    for name in ("l_kl", "l_adv_u"):
        assert {b for b, hit in block_grads(learner, name, x, y).items() if hit} == {"learngene"}
    assert {b for b, hit in block_grads(learner, "l_ce", x, y).items() if hit} == {"classifier"}


def test_joint_training_lets_the_reconstruction_reach_persona(tiny_data):
    learner = make(drdfl_training="joint")
    assert block_grads(learner, "l_rec", tiny_data.x_train, tiny_data.y_train)["persona"]


@pytest.mark.parametrize(
    "ablation, dropped",
    [("no-pr", {"l_cls", "l_log"}), ("no-gl", {"l_kl", "l_adv_u"}), ("none", set())],
)
def test_table5_ablations_drop_their_losses(tiny_data, ablation, dropped):
    parts = make(drdfl_ablation=ablation).losses(tiny_data.x_train, tiny_data.y_train)
    everything = {"l_cls", "l_log", "l_kl", "l_adv_u", "l_rec", "l_ce"}
    assert set(parts) == everything - dropped


def test_collapsed_learngene_raises_the_health_alarm(tiny_data, monkeypatch):
    """A decoder that ignores z_l (the reviewed collapse) must be flagged, in the
    metrics and in the node's log."""
    warnings = []
    monkeypatch.setattr(drdfl, "log", lambda level, msg, *args: warnings.append(msg % args))
    learner = make()
    learner.rounds_trained = drdfl.ZL_WARMUP_ROUNDS
    with torch.no_grad():
        learner.decoder.fc.weight[:, learner.opts.persona_dim :] = 0.0  # z_l inputs cut
        learner.learngene.moments.weight.zero_()
        learner.learngene.moments.bias.zero_()  # q(z_l|x) = N(0, I): KL = 0
    health = learner.health(tiny_data)
    assert health["alarm_zl_unused"] == 1.0
    assert health["health_zl_kl_per_dim"] == pytest.approx(0.0, abs=1e-6)
    assert abs(health["health_rec_gap_zl"]) < 1e-6
    assert any("z_l looks unused" in w for w in warnings)
    # An untouched model, whose decoder reads z_l, does not raise it.
    assert make().health(tiny_data)["alarm_zl_unused"] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_learngene_carries_information_after_training_on_real_digits(seed):
    """The mechanism, not the plumbing: trained per block (Algorithm 1) on one real
    digits client, the decoder comes to rely on z_l; trained jointly (the reconstruction
    also through PersonaNet), PersonaNet's code bypasses it and z_l is ignored.

    Seed-dependent in size: over seeds 0-5 the per-block gap was 0.05-0.47 and above the
    joint one every time, but seed 42 (0.028 vs 0.038) is an exception, so the claim is
    checked on two seeds rather than read off one."""
    from drdfl_flwr.data import load_client_data

    gaps = {}
    for training in ("per-block", "joint"):
        cfg = make_config(method="drdfl", drdfl_training=training, device="cpu", seed=seed)
        data = load_client_data(cfg, 0, 5)
        learner = build_learner(cfg, data.input_shape, data.num_classes)
        for _ in range(12):
            health = learner.fit(data)
        gaps[training] = health["health_rec_gap_zl"]
        if training == "per-block":
            assert health["health_zl_kl_per_dim"] > 0.01
            assert health["alarm_zl_unused"] == 0.0
    assert gaps["per-block"] > 0.1, gaps
    assert gaps["joint"] < gaps["per-block"], gaps


def trained_sender(tiny_data, rounds: int = 2):
    sender = build_learner(make_config(method="drdfl", local_epochs=1), SHAPE, K, partition_id=1)
    for _ in range(rounds):
        sender.fit(tiny_data)
    return sender


def test_a_late_joiner_starts_from_the_received_learngene_and_priors(tiny_data):
    """Algorithm 2: phi <- received, (mu, Sigma) <- received, private modules its own."""
    payload = trained_sender(tiny_data).shared_payload()
    joiner = make()
    persona_before = snapshot(joiner.persona)
    joiner.receive(peers(payload), server_round=4)  # never trained, ring running: joins
    for k, v in joiner.learngene.state_dict().items():
        assert torch.equal(v, payload[f"learngene.{k}"])
    assert torch.allclose(joiner.stats.mu, payload["stats.mu"])
    assert torch.allclose(joiner.stats.variance(), payload["stats.var"], rtol=1e-5)
    assert unchanged(joiner.persona, persona_before)  # fresh PersonaNet, not the sender's
    assert "persona" not in " ".join(payload)


def test_a_late_joiner_keeps_its_priors_fixed_for_five_rounds(tiny_data):
    sender = trained_sender(tiny_data)
    joiner = make(local_epochs=1)
    frozen = []
    for round_number in range(3, 10):  # joins in round 3, then receives every round
        sender.fit(tiny_data)
        joiner.receive(peers(sender.shared_payload()), round_number)
        if round_number == 3:
            priors = snapshot(joiner.stats)
        frozen.append(joiner.fit(tiny_data)["priors_frozen"])
        if len(frozen) <= 5:  # T_init = 5 rounds of training on the joined priors
            assert unchanged(joiner.stats, priors), len(frozen)
    assert frozen == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert not unchanged(joiner.stats, priors)  # free again: gradient and EMA move them


def test_the_control_absorbs_the_first_payload_like_any_other(tiny_data):
    payload = trained_sender(tiny_data).shared_payload()
    joiner = make(drdfl_late_join="absorb")
    start = joiner.stats.mu.detach().clone()
    joiner.receive(peers(payload), server_round=4)
    alpha = joiner.opts.ema_alpha
    assert torch.allclose(joiner.stats.mu, alpha * start + (1 - alpha) * payload["stats.mu"])
    assert not joiner.stats.frozen


def test_round_one_and_trained_nodes_absorb_rather_than_join(tiny_data):
    payload = trained_sender(tiny_data).shared_payload()
    for node, server_round in ((make(), 1), (trained_sender(tiny_data, rounds=1), 5)):
        node.receive(peers(payload), server_round)
        assert not node.stats.frozen
        assert not torch.allclose(node.stats.mu, payload["stats.mu"])
