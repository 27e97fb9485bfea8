"""FedFed: the shared features are noisy performance-sensitive parts, never raw images;
the hub pools them; the node trains on its own data plus a class-balanced draw from
the pool; the phases switch at distill-rounds; a bad pool changes nothing."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from baselines.fedfed import (
    MAX_REL_ERR,
    MAX_SHARE_PSNR_DB,
    PSNR_CAP_DB,
    SHARE_X,
    SHARE_Y,
    FedFedLearner,
    balanced_indices,
    fedfed_reduce,
    psnr_db,
    relative_error,
    share_alarms,
)
from drdfl_flwr import privacy
from drdfl_flwr.config import ConfigError
from drdfl_flwr.health import ALARMS
from drdfl_flwr.payload import PayloadError, from_hub, peers
from drdfl_flwr.registry import build_learner
from strategies.reducers import Contribution, ReductionError
from tests.conftest import as_tensors, contribution, make_config, random_client_data

SHAPE, K, BATCH = (1, 8, 8), 10, 16


def node(partition_id: int = 0, **extra) -> FedFedLearner:
    base = {
        "method": "fedfed",
        "seed": 11,
        "local_epochs": 1,
        "batch_size": BATCH,
        "device": "cpu",
        "fedfed_distill_rounds": 1,
    }
    return build_learner(make_config(**{**base, **extra}), SHAPE, K, partition_id=partition_id)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def prefixes(payload) -> set[str]:
    return {k.split(".")[0] for k in payload}


def share_round(learner: FedFedLearner, data) -> dict[str, torch.Tensor]:
    """Run the node up to and through its share round; return that round's payload."""
    while learner.phase() == "distill":
        learner.fit(data)
    learner.fit(data)
    return learner.shared_payload()


def hub_pool(nodes, datas) -> tuple[dict[str, torch.Tensor], list[Contribution]]:
    replies = []
    for p, (n, d) in enumerate(zip(nodes, datas, strict=True)):
        payload = share_round(n, d)
        replies.append(contribution(p, payload, {"num-examples": float(len(d.y_train))}))
    return as_tensors(fedfed_reduce(replies, None)), replies


# -- what is shared ---------------------------------------------------------------------------
def test_shared_features_are_never_a_raw_training_image():
    """No row of share.x lies within 1e-3 (max-abs) of any of the node's training images;
    every row is x - x_hat + eps of one of them, paired with its label."""
    data = random_client_data(48, seed=1)
    learner = node()
    payload = share_round(learner, data)
    x, y = payload[SHARE_X], payload[SHARE_Y]
    assert x.dtype == torch.float16 and y.dtype == torch.float32
    assert x.shape == (48, *SHAPE) and y.shape == (48,)  # share-fraction = 1
    distance = (x.float()[:, None] - data.x_train[None]).abs().flatten(2).amax(2)
    assert distance.min() > 1e-3, "a shared row equals a raw training image"
    # ... and the rows are the node's own samples' features, labels kept (sorted subset)
    torch.testing.assert_close(y.long(), data.y_train)


def test_share_fraction_limits_the_rows():
    data = random_client_data(40, seed=2)
    payload = share_round(node(fedfed_share_fraction=0.25), data)
    assert payload[SHARE_X].shape[0] == payload[SHARE_Y].shape[0] == 10


def test_the_noise_is_really_there():
    """Same generator state, two noise generators: different rows, differing by noise of
    std sigma (sqrt(2) sigma between two draws); the same seed gives the same rows."""
    learner = node(fedfed_sigma=0.2)
    x = random_client_data(64, seed=3).x_train
    first = learner.distilled_features(x, torch.Generator().manual_seed(1))
    again = learner.distilled_features(x, torch.Generator().manual_seed(1))
    other = learner.distilled_features(x, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    diff = (first - other).flatten(1)
    assert (diff.abs().amax(1) > 1e-3).all(), "some rows carry no noise"
    assert diff.std().item() == pytest.approx(0.2 * 2**0.5, rel=0.1)
    # the noiseless part is x - x_hat with the generator in evaluation mode (latent mean)
    with torch.no_grad():
        learner.generator.eval()
        x_hat, _, _ = learner.generator(x)
    noise = first - (x - x_hat)
    assert noise.std().item() == pytest.approx(0.2, rel=0.1)


# -- the hub's pool ----------------------------------------------------------------------------
def test_the_hub_pools_rows_in_partition_order_and_averages_the_classifier():
    datas = [random_client_data(24, seed=4), random_client_data(40, seed=5)]
    nodes = [node(p) for p in range(2)]
    pool, replies = hub_pool(nodes, datas)
    sent = [as_tensors(r.arrays) for r in replies]
    torch.testing.assert_close(pool[SHARE_X], torch.cat([s[SHARE_X] for s in sent]))
    torch.testing.assert_close(pool[SHARE_Y], torch.cat([s[SHARE_Y] for s in sent]))
    assert pool[SHARE_X].dtype == torch.float16
    for key in (k for k in pool if k.startswith("classifier.")):
        want = (24 * sent[0][key] + 40 * sent[1][key]) / 64
        torch.testing.assert_close(pool[key], want)
    assert not any(k.startswith("generator.") for k in pool)
    # rows of one reply that lost their pairing are refused, not concatenated
    broken = dict(sent[1])
    broken[SHARE_Y] = broken[SHARE_Y][:-1]
    with pytest.raises(ReductionError, match="row counts"):
        fedfed_reduce([replies[0], contribution(1, broken, replies[1].metrics)], None)
    with pytest.raises(ReductionError, match="dtype"):
        ints = {**sent[1], SHARE_Y: sent[1][SHARE_Y].long()}
        fedfed_reduce([replies[0], contribution(1, ints, replies[1].metrics)], None)


def test_balanced_indices_draw_every_class_equally():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 1 + [7] * 9)
    gen = torch.Generator().manual_seed(0)
    idx = balanced_indices(labels, 31, gen)
    assert len(idx) == 31
    counts = torch.bincount(labels[idx], minlength=8)
    drawn = counts[[0, 1, 2, 7]]
    assert drawn.sum() == 31 and drawn.max() - drawn.min() <= 1 and counts[[3, 4, 5, 6]].sum() == 0
    # within a class rows are drawn without replacement until the class is exhausted
    zeros = idx[labels[idx] == 0]
    assert len(zeros.unique()) == len(zeros)
    sevens = idx[labels[idx] == 7]
    assert len(sevens.unique()) == min(len(sevens), 9)


def test_pooled_training_concatenates_own_batches_with_balanced_pool_rows():
    """After the pool arrives, every training batch is B own samples followed by B pooled
    rows; over the epoch the pooled rows come class-balanced from a skewed pool."""
    own = random_client_data(48, seed=6)
    nodes = [node(p) for p in range(2)]
    skewed = random_client_data(48, seed=7)
    skewed.y_train[:40] = 0  # a pool dominated by class 0
    pool, _ = hub_pool(nodes, [own, skewed])
    learner = nodes[0]
    learner.absorb(from_hub(pool))
    assert len(learner.pool) == 96 and learner.pool.x.dtype == torch.float16
    seen: list[torch.Tensor] = []
    hook = learner.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    metrics = learner.fit(own)
    hook.remove()
    assert metrics["local_steps"] == 3 and metrics["health_pool_size"] == 96
    pool_rows = learner.pool.x.float().flatten(1)
    pooled_labels = []
    for batch in seen:
        assert len(batch) == 2 * BATCH
        first, second = batch[:BATCH].flatten(1), batch[BATCH:].flatten(1)
        own_match = (first[:, None] - own.x_train.flatten(1)[None]).abs().amax(2).min(1).values
        assert (own_match == 0).all()  # the first half: the node's own samples
        hit = (second[:, None] - pool_rows[None]).abs().amax(2)
        assert (hit.min(1).values == 0).all()  # the second half: rows of the pool
        pooled_labels.append(learner.pool.y[hit.argmin(1)])
    counts = torch.bincount(torch.cat(pooled_labels), minlength=K)
    present = counts[learner.pool.y.unique()]
    assert present.max() - present.min() <= 1  # class-balanced, not pool-proportional


# -- phases ------------------------------------------------------------------------------------
def test_phases_switch_at_distill_rounds():
    """D = 2: two rounds send generator + classifier (the generator trains), the third
    sends classifier + shares, then the classifier alone (the generator is frozen)."""
    data = random_client_data(32, seed=8)
    learner = node(fedfed_distill_rounds=2)
    kinds, generators = [], []
    for _ in range(2):
        generators.append(state(learner.generator))
        metrics = learner.fit(data)
        assert "l_rec" in metrics and "l_kl" in metrics
        kinds.append(prefixes(learner.shared_payload()))
    assert kinds == [{"generator", "classifier"}] * 2
    assert not same(generators[0], state(learner.generator))  # the generator trained
    assert learner.phase() == "share"
    frozen = state(learner.generator)
    metrics = learner.fit(data)
    assert metrics["health_share_rows"] == 32 and metrics["health_share_min_gap"] > 1e-3
    assert prefixes(learner.shared_payload()) == {"classifier", "share"}
    payload = learner.shared_payload()
    pool = {k: v for k, v in payload.items()}  # a one-node pool
    learner.absorb(from_hub(pool))
    metrics = learner.fit(data)
    assert metrics["health_pool_size"] == 32
    assert prefixes(learner.shared_payload()) == {"classifier"}
    assert len(learner.outbox) == 0  # the shares left with the share round
    assert same(frozen, state(learner.generator))


def test_absorb_expects_what_the_phase_sent():
    data = random_client_data(32, seed=9)
    learner = node()
    learner.fit(data)  # distill round: the next aggregate is generator + classifier
    classifier_only = {
        k: v for k, v in learner.shared_payload().items() if k.startswith("classifier.")
    }
    with pytest.raises(PayloadError, match="missing"):
        learner.absorb(from_hub(classifier_only))
    with pytest.raises(PayloadError, match="peer"):
        learner.receive(peers(learner.shared_payload()), 1)


# -- a bad pool --------------------------------------------------------------------------------
def test_a_bad_pool_is_refused_changing_nothing():
    data = random_client_data(32, seed=10)
    learner = node()
    good = share_round(learner, data)
    good = {k: (v + 0.01 if k.startswith("classifier.") else v) for k, v in good.items()}
    before = (state(learner.classifier), state(learner.generator), len(learner.pool))
    x, y = good[SHARE_X], good[SHARE_Y]
    nan_x = x.clone()
    nan_x[3, 0, 2, 2] = float("nan")
    bad_pools = [
        {SHARE_X: nan_x},
        {SHARE_X: x[:, :, :, :7]},  # wrong image shape
        {SHARE_X: x[0]},  # not a batch of images
        {SHARE_Y: y[:-1]},  # labels lost their pairing
        {SHARE_Y: y + 0.5},  # not class indices
        {SHARE_Y: y + K},  # out of range
        {SHARE_Y: y.long()},  # integer labels: the reducer never sends them
        {SHARE_Y: torch.full_like(y, float("inf"))},
    ]
    for change in bad_pools:
        with pytest.raises(PayloadError):
            learner.absorb(from_hub({**good, **change}))
    missing = {k: v for k, v in good.items() if k != SHARE_Y}
    with pytest.raises(PayloadError, match="lacks"):
        learner.absorb(from_hub(missing))
    key = next(k for k in good if k.startswith("classifier."))
    with pytest.raises(PayloadError):  # a good pool beside a bad model changes nothing either
        learner.absorb(from_hub({**good, key: torch.full_like(good[key], float("nan"))}))
    assert same(before[0], state(learner.classifier))
    assert same(before[1], state(learner.generator))
    assert len(learner.pool) == before[2] == 0
    learner.absorb(from_hub(good))  # the good one is taken
    assert len(learner.pool) == 32
    assert not same(before[0], state(learner.classifier))


def test_without_a_pool_the_node_trains_on_its_own_data():
    data = random_client_data(32, seed=12)
    learner = node()
    share_round(learner, data)
    metrics = learner.fit(data)  # the pool never arrived
    assert metrics["health_pool_size"] == 0 and metrics["local_steps"] == 2


# -- state -------------------------------------------------------------------------------------
def test_options_and_schedule_are_validated():
    for bad in (
        {"fedfed_sigma": 0.0},
        {"fedfed_share_fraction": 0.0},
        {"fedfed_share_fraction": 1.5},
        {"fedfed_distill_rounds": 0},
        {"fedfed_weight_kl": -1.0},
        {"fedfed_distill_epochs": -1},
        {"fedfed_distill_rounds": 3, "num_server_rounds": 4},  # the pool would never be used
    ):
        with pytest.raises(ConfigError, match="fedfed|num-server-rounds"):
            make_config(method="fedfed", **bad)
    make_config(method="fedfed", fedfed_distill_rounds=1, num_server_rounds=3)


def test_reducer_output_is_plain_arrays():
    """The hub's fedfed aggregate is numpy arrays that keep the float16 wire format."""
    record = ArrayRecord({SHARE_X: Array(np.zeros((2, 1, 8, 8), np.float16))})
    out = fedfed_reduce([contribution(0, record, {"num-examples": 2.0})], None)
    assert isinstance(out[SHARE_X], np.ndarray) and out[SHARE_X].dtype == np.float16


# -- health: is the generator splitting anything off? ------------------------------------------
class FixedGenerator(torch.nn.Module):
    """A stand-in generator: x_hat = x ("identity") or x_hat = a fixed image ("mean")."""

    def __init__(self, image: torch.Tensor | None = None) -> None:
        super().__init__()
        self.image = image

    def forward(self, x, noise=None):
        x_hat = x.clone() if self.image is None else self.image.expand_as(x).clone()
        zeros = torch.zeros(len(x), 4)
        return x_hat, zeros, zeros


def test_relative_error_is_against_the_mean_image_and_psnr_uses_the_data_range():
    """Images that differ mostly by a per-pixel offset: predicting the mean image is
    relative error 1 (not the much smaller error against the overall variance); PSNR is
    10 log10(2^2 / MSE) per row, capped where the row equals its image."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.linspace(-0.9, 0.9, 64).view(1, 1, 8, 8)
    x = (offsets + 0.05 * torch.randn((40, *SHAPE), generator=gen)).clamp(-1, 1)
    assert relative_error(x, x) == 0.0
    assert relative_error(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(1.0)
    assert relative_error(x, torch.zeros_like(x)) > 50  # far worse than the mean image
    assert math.isnan(relative_error(x[:1], x[:1]))  # no variance to compare with
    noise = 0.1 * torch.randn(x.shape, generator=gen)
    seen = (x + noise).clamp(-1, 1)  # a shared row is compared as an image would be shown
    mse = (seen - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr_db(x + noise, x), 10 * torch.log10(4.0 / mse))
    assert (psnr_db(x, x) == PSNR_CAP_DB).all()
    one = x[:1] + noise[:1]  # one row: the project's PSNR (privacy.psnr) exactly
    assert psnr_db(one, x[:1]).item() == pytest.approx(privacy.psnr(one, x[:1]), abs=1e-4)


def test_health_metrics_follow_what_the_generator_splits_off():
    """A generator that reconstructs x exactly shares pure noise (relative error 0, PSNR
    about 10 log10(4 / (E[x^2] + sigma^2)) = 10.5 dB on uniform [-1, 1] images, no alarm);
    one that outputs the mean image shares x minus a constant plus noise (relative error
    1, PSNR about 21 dB: both alarms). Distill rounds report the metrics too; pooled rounds
    repeat the share round's values."""
    data = random_client_data(48, seed=14)
    healthy = node()
    metrics = healthy.fit(data)  # distill round, untrained generator: measured on the probe
    assert metrics["health_gen_rel_err"] == pytest.approx(1.0, abs=0.3)
    assert 15 < metrics["health_share_psnr_db"] < 30
    assert not any(k.startswith("alarm_") for k in metrics)  # no alarm while distilling
    healthy.generator = FixedGenerator()
    metrics = healthy.fit(data)  # share round
    assert metrics["health_gen_rel_err"] == 0.0
    sent = healthy.shared_payload()[SHARE_X].float()
    want = psnr_db(sent, data.x_train).mean().item()
    assert metrics["health_share_psnr_db"] == pytest.approx(want, abs=0.05)
    assert metrics["health_share_psnr_db"] == pytest.approx(10.5, abs=0.5)
    assert metrics["alarm_fedfed_generator_idle"] == metrics["alarm_fedfed_share_near_raw"] == 0

    idle = node()
    idle.fit(data)
    trained, idle.generator = idle.generator, FixedGenerator(data.x_train.mean(0, keepdim=True))
    metrics = idle.fit(data)
    idle.generator = trained  # frozen from here on; the state keeps the share round's health
    assert metrics["health_gen_rel_err"] == pytest.approx(1.0, rel=1e-4)
    assert metrics["health_share_psnr_db"] == pytest.approx(21.3, abs=0.6)
    assert metrics["alarm_fedfed_generator_idle"] == metrics["alarm_fedfed_share_near_raw"] == 1
    shared_round = metrics
    idle.absorb(from_hub(idle.shared_payload()))  # a one-node pool
    later = idle.fit(data)
    restored = node()
    restored.load_bytes(idle.to_bytes())
    for pooled in (later, restored.fit(data)):
        for key in (
            "health_gen_rel_err",
            "health_share_psnr_db",
            "alarm_fedfed_generator_idle",
            "alarm_fedfed_share_near_raw",
        ):
            assert pooled[key] == pytest.approx(shared_round[key], rel=1e-6), key


def test_the_warning_names_the_values_once_on_an_idle_generator_only(caplog):
    data = random_client_data(48, seed=15)
    runs = {}
    for name, generator in (
        ("good", FixedGenerator()),
        ("idle", FixedGenerator(data.x_train.mean(0, keepdim=True))),
    ):
        learner = node(partition_id=3)
        learner.fit(data)
        learner.generator = generator
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flwr"):
            learner.fit(data)  # share round
            learner.absorb(from_hub(learner.shared_payload()))
            learner.fit(data)  # pooled round: the alarm stays up, the warning is not repeated
        runs[name] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert runs["good"] == []
    (message,) = runs["idle"]
    assert "partition 3" in message and "1.00 of the pixel variance" in message
    assert f"above {MAX_REL_ERR:.2f}" in message and f"above {MAX_SHARE_PSNR_DB:.0f} dB" in message
    assert "21." in message  # the PSNR, named
    assert message.endswith("fedfed_generator_idle, fedfed_share_near_raw")


def test_thresholds_and_alarm_texts():
    assert share_alarms(0.49, 19.9) == {
        "alarm_fedfed_generator_idle": 0.0,
        "alarm_fedfed_share_near_raw": 0.0,
    }
    assert share_alarms(0.51, 20.1) == {
        "alarm_fedfed_generator_idle": 1.0,
        "alarm_fedfed_share_near_raw": 1.0,
    }
    for key in share_alarms(1.0, 30.0):
        assert key in ALARMS and "FedFed" in ALARMS[key]  # the ServerApp explains them


def test_distill_epochs_set_the_generator_s_epochs_only():
    """``distill-epochs = 3``: each distill round runs 3 epochs (2 batches each here); the
    share and pooled rounds keep ``local-epochs`` (1). 0 means ``local-epochs``; the
    default is 5."""
    data = random_client_data(32, seed=16)
    learner = node(fedfed_distill_epochs=3)
    assert learner.fit(data)["local_steps"] == 6
    assert learner.fit(data)["local_steps"] == 2  # the share round
    assert node(fedfed_distill_epochs=0).fit(data)["local_steps"] == 2
    assert node().fit(data)["local_steps"] == 10
