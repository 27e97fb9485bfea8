"""DSLTH (paper 003): shared fixed weights, top-r masks, straight-through scores, 1-bit payloads."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import RecordDict

from drdfl_flwr.bitpack import pack_bits, packed_length, unpack_bits
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.methods.dslth import DSLTHLearner, keep_ratio_for
from drdfl_flwr.models.masked import MaskedAlexNet, kept_entries
from drdfl_flwr.payload import (
    PayloadError,
    content_bytes,
    from_array_record,
    to_array_record,
)

SHAPE = (1, 8, 8)
K = 4
# Flower serializes each array with numpy's .npy header (128 bytes) plus protobuf framing
# and the key; measured at ~195 bytes per layer for flwr 1.41. Allowance: 256 per layer.
HEADER_BYTES_PER_LAYER = 256


def make_cfg(**extra) -> RunConfig:
    base = {"method": "dslth", "seed": 3, "local_epochs": 1, "batch_size": 16, "device": "cpu"}
    return RunConfig(**{**base, **extra})


def make_data(n: int = 48, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    return ClientData(x, y, x[:8], y[:8], x[:16], y[:16], K)


def wire_bytes(payload) -> int:
    return content_bytes(RecordDict({"payload": to_array_record(payload)}))


def weights(learner: DSLTHLearner) -> dict[str, torch.Tensor]:
    return {n: m.weight.clone() for n, m in learner.net.masked_layers().items()}


def test_bitpack_roundtrip_and_padding_check():
    mask = torch.rand(3, 7) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_length(21) == 3
    assert torch.equal(unpack_bits(packed, (3, 7)), mask)
    bad = packed.clone()
    bad[-1] |= 1  # a padding bit (21 entries use 5 bits of the last byte)
    with pytest.raises(PayloadError, match="padding"):
        unpack_bits(bad, (3, 7))


def test_payload_is_one_bit_per_entry_plus_small_header():
    learner = DSLTHLearner(make_cfg(dslth_keep_ratio=0.3), SHAPE, K)
    payload = learner.shared_payload()
    sizes = [layer.num_entries for layer in learner.net.masked_layers().values()]
    assert all(t.dtype == torch.uint8 for t in payload.values())
    bound = sum(math.ceil(n / 8) for n in sizes) + HEADER_BYTES_PER_LAYER * len(sizes)
    assert wire_bytes(payload) <= bound
    # ... and far below the float32 weights it stands for
    assert wire_bytes(payload) < 4 * sum(sizes) / 16
    assert learner.paper_payload_bits() == sum(kept_entries(n, 0.3) for n in sizes)


def test_alexnet_payload_bound_and_shapes():
    net = MaskedAlexNet((3, 32, 32), 10, 0.5, weight_seed=0, score_seed=1)
    shapes = [tuple(m.weight.shape) for m in net.masked_layers().values()]
    assert shapes == [
        (64, 3, 5, 5),
        (128, 64, 5, 5),
        (256, 128, 5, 5),
        (1024, 4096),
        (192, 1024),
        (10, 192),
    ]
    payload = {n: pack_bits(m.binary_mask()) for n, m in net.masked_layers().items()}
    sizes = [math.prod(s) for s in shapes]
    bound = sum(math.ceil(n / 8) for n in sizes) + HEADER_BYTES_PER_LAYER * len(sizes)
    assert wire_bytes(payload) <= bound
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_nodes_share_fixed_weights_but_not_scores():
    cfg = make_cfg(dslth_keep_ratios="0.2,0.7")
    a = DSLTHLearner(cfg, SHAPE, K, partition_id=0)
    torch.manual_seed(12345)  # the global RNG must not matter
    b = DSLTHLearner(cfg, SHAPE, K, partition_id=1)
    assert a.keep_ratio == 0.2 and b.keep_ratio == 0.7
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(a.net.features[0].scores.detach(), b.net.features[0].scores.detach())
    other_seed = DSLTHLearner(make_cfg(seed=4), SHAPE, K)
    assert not torch.equal(other_seed.net.features[0].weight, wa["features.0"])


def test_fixed_weights_do_not_change_during_training():
    learner = DSLTHLearner(make_cfg(dslth_group_lasso=1e-3), SHAPE, K)
    before = weights(learner)
    scores_before = learner.net.features[0].scores.detach().clone()
    learner.absorb([DSLTHLearner(make_cfg(), SHAPE, K, partition_id=1).shared_payload()])
    metrics = learner.fit(make_data())
    assert {"l_ce", "l_group_lasso", "finetune_l_ce"} <= set(metrics)
    after = weights(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(scores_before, learner.net.features[0].scores.detach())
    assert [n for n, _ in learner.net.named_parameters()] == [
        f"{n}.scores" for n in learner.net.masked_layers()
    ]


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 1.0])
def test_top_r_keeps_exact_fraction_per_layer(ratio):
    learner = DSLTHLearner(make_cfg(dslth_keep_ratio=ratio), SHAPE, K)
    for layer in learner.net.masked_layers().values():
        mask = layer.binary_mask()
        assert int(mask.sum()) == max(1, round(ratio * mask.numel()))
        kept = layer.scores.detach().abs()[mask]
        dropped = layer.scores.detach().abs()[~mask]
        if dropped.numel():
            assert kept.min() >= dropped.max()  # the largest |s| are the kept ones


def test_straight_through_gradients_reach_all_scores():
    learner = DSLTHLearner(make_cfg(dslth_keep_ratio=0.3), SHAPE, K)
    data = make_data()
    loss = torch.nn.functional.cross_entropy(learner.net(data.x_train), data.y_train)
    loss.backward()
    for layer in learner.net.masked_layers().values():
        grad = layer.scores.grad
        assert grad is not None and torch.isfinite(grad).all()
        dropped = ~layer.binary_mask()
        assert grad[dropped].abs().sum() > 0  # masked-out entries learn too (STE)
        assert layer.weight.grad is None


def test_fusion_follows_intermediate_tensor():
    a = DSLTHLearner(make_cfg(), SHAPE, K, partition_id=0)
    payloads = [DSLTHLearner(make_cfg(), SHAPE, K, partition_id=p).shared_payload() for p in (1, 2)]
    wire = [from_array_record(to_array_record(p)) for p in payloads]  # through Flower types
    layer = a.net.features[0]
    s = layer.scores.detach().clone()
    masks = torch.stack([unpack_bits(p["mask.features.0"], s.shape) for p in wire]).float()
    expected = s + s.abs().mean() * s.sign() * masks.mean(0)
    a.absorb(wire)
    assert torch.allclose(layer.scores.detach(), expected)
    assert bool(a.net.pending_finetune)


def test_malformed_payloads_are_rejected_without_change():
    learner = DSLTHLearner(make_cfg(), SHAPE, K)
    good = DSLTHLearner(make_cfg(), SHAPE, K, partition_id=1).shared_payload()
    key = "mask.features.0"
    state = learner.to_bytes()
    bad_payloads = {
        "missing": {k: v for k, v in good.items() if k != key},
        "extra": {**good, "mask.extra": torch.zeros(1, dtype=torch.uint8)},
        "dtype": {**good, key: good[key].float()},
        "length": {**good, key: good[key][:-1]},
        "rank": {**good, key: good[key].view(1, -1)},
    }
    for name, bad in bad_payloads.items():
        with pytest.raises(PayloadError):
            learner.absorb([good, bad])
        assert learner.to_bytes() == state, name


def test_state_roundtrip_and_seed_check():
    cfg = make_cfg()
    learner = DSLTHLearner(cfg, SHAPE, K)
    learner.fit(make_data())
    blob = learner.to_bytes()
    twin = DSLTHLearner(cfg, SHAPE, K, partition_id=5)
    twin.load_bytes(blob)
    x = make_data(seed=1).x_train
    assert torch.equal(twin.predict(x), learner.predict(x))
    assert twin.rounds_trained == 1
    with pytest.raises(ValueError, match="fixed weights"):
        DSLTHLearner(make_cfg(seed=99), SHAPE, K).load_bytes(blob)


def test_keep_ratio_parsing():
    assert make_cfg().keep_ratio_list() == []
    assert make_cfg(dslth_keep_ratios="0.2, 0.5").keep_ratio_list() == [0.2, 0.5]
    assert keep_ratio_for(make_cfg(dslth_keep_ratios="0.2,0.5"), 3) == 0.5
    assert keep_ratio_for(make_cfg(dslth_keep_ratio=0.4), 3) == 0.4
    for bad in ("0", "1.5", "a,0.3"):
        with pytest.raises(ConfigError) as err:
            make_cfg(dslth_keep_ratios=bad)
        assert err.value.key.startswith("dslth-keep-ratio")
    with pytest.raises(ConfigError) as err:
        make_cfg(dslth_keep_ratio=0.0)
    assert err.value.key.startswith("dslth-keep-ratio")


@pytest.mark.parametrize(
    "key, value",
    [
        ("dslth_group_lasso", -1e-3),
        ("dslth_finetune_steps", -1),
        ("dslth_weight_init", "zeros"),
        ("classifier", "resnet18"),
    ],
)
def test_bad_dslth_config_is_refused_by_run_config(key, value):
    with pytest.raises(ConfigError) as err:
        make_cfg(**{key: value})
    assert err.value.key == key.replace("_", "-")
