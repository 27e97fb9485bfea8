"""DSLTH (paper 003): shared fixed weights, top-r masks, straight-through scores, 1-bit payloads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from drdfl_flwr.bitpack import pack_bits, packed_length, unpack_bits
from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import ClientData
from drdfl_flwr.methods.dslth import DSLTHLearner, DSLTHOptions, keep_ratios_for
from drdfl_flwr.models.masked import MaskedAlexNet, MaskedConv2d, kept_entries
from drdfl_flwr.payload import PayloadError, peers
from drdfl_flwr.records import from_array_record, to_array_record
from drdfl_flwr.registry import build_learner, resolved_topology
from strategies.topology import build_topology
from strategies.wire import content_bytes
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (1, 8, 8)
K = 4
# Flower serializes each array with numpy's .npy header (128 bytes) plus protobuf framing
# and the key; measured at ~195 bytes per layer for flwr 1.41. Allowance: 256 per layer.
HEADER_BYTES_PER_LAYER = 256


def make_cfg(**extra) -> RunConfig:
    base = {"method": "dslth", "seed": 3, "local_epochs": 1, "batch_size": 16, "device": "cpu"}
    return make_config(**{**base, **extra})


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
    learner = DSLTHLearner(make_cfg(), SHAPE, K)
    payload = learner.shared_payload()
    layers = list(learner.net.masked_layers().values())
    sizes = [layer.num_entries for layer in layers]
    assert all(t.dtype == torch.uint8 for t in payload.values())
    bound = sum(math.ceil(n / 8) for n in sizes) + HEADER_BYTES_PER_LAYER * len(sizes)
    assert wire_bytes(payload) <= bound
    # ... and far below the float32 weights it stands for
    assert wire_bytes(payload) < 4 * sum(sizes) / 16
    ratio = {"conv": 0.3, "fc": 0.9}
    assert learner.paper_payload_bits() == sum(
        kept_entries(layer.num_entries, ratio[layer.kind]) for layer in layers
    )


def test_released_mce_pl_network():
    """models/alex_cifar_att2.py of ZhuoJTian/MCE-PL: 1,227,328 mask entries for K = 10."""
    net = MaskedAlexNet((3, 32, 32), 10, (0.3, 0.9), weight_seed=0, score_seed=1, mask_seed=2)
    layers = net.masked_layers()
    assert [tuple(m.weight.shape) for m in layers.values()] == [
        (64, 3, 5, 5),
        (128, 64, 5, 5),
        (256, 128, 5, 5),
        (192, 1024),
        (10, 192),
    ]
    assert sum(m.num_entries for m in layers.values()) == 1_227_328
    assert [m.keep_ratio for m in layers.values()] == [0.3, 0.3, 0.3, 0.9, 0.9]
    assert [m.padding for m in net.features if isinstance(m, MaskedConv2d)] == [1, 1, 1]
    assert sum(isinstance(m, torch.nn.ELU) for m in net.modules()) == 5
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in net.modules()) == 3
    pools = [m for m in net.features if isinstance(m, torch.nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [
        (3, 2, 0),
        (3, 2, 0),
        (3, 2, 1),
    ]
    dense = [m for m in layers.values() if m.kind == "fc"]
    assert all(m.bias is not None for m in dense)  # fixed biases, not trained
    assert [n for n, _ in net.named_parameters()] == [f"{n}.scores" for n in layers]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    payload = {n: pack_bits(m.binary_mask()) for n, m in layers.items()}
    assert sum(p.numel() for p in payload.values()) == sum(
        math.ceil(m.num_entries / 8) for m in layers.values()
    )


def test_nodes_share_fixed_weights_but_not_scores():
    cfg = make_cfg(dslth_keep_ratios="0.2/0.5,0.7")
    a = DSLTHLearner(cfg, SHAPE, K, partition_id=0)
    torch.manual_seed(12345)  # the global RNG must not matter
    b = DSLTHLearner(cfg, SHAPE, K, partition_id=1)
    assert a.keep_ratios == (0.2, 0.5) and b.keep_ratios == (0.7, 0.9)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(a.net.features[0].scores.detach(), b.net.features[0].scores.detach())
    other_seed = DSLTHLearner(make_cfg(seed=4), SHAPE, K)
    assert not torch.equal(other_seed.net.features[0].weight, wa["features.0"])


def initial_masks(learner: DSLTHLearner) -> dict[str, torch.Tensor]:
    return {n: m.neighbour_mean.clone() for n, m in learner.net.masked_layers().items()}


def test_every_node_starts_from_one_initial_neighbour_mask():
    """The release draws one Bernoulli(r) mask_list and gives it to every client: the same
    on every node, from the run seed only (not the partition, not the global RNG)."""
    cfg = make_cfg()
    a = build_learner(cfg, SHAPE, K, partition_id=0)
    torch.manual_seed(12345)
    b = DSLTHLearner(cfg, SHAPE, K, partition_id=7)
    ma, mb = initial_masks(a), initial_masks(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    for name, layer in a.net.masked_layers().items():
        assert set(ma[name].unique().tolist()) <= {0.0, 1.0}  # a binary mask, as released
        if layer.num_entries >= 1000:
            assert abs(ma[name].mean().item() - layer.keep_ratio) < 0.05  # Bernoulli(r)
    assert a.shared_payload().keys() == b.shared_payload().keys()
    assert any(  # ... while the scores, and so the sent masks, stay private
        not torch.equal(a.shared_payload()[k], b.shared_payload()[k]) for k in a.shared_payload()
    )
    other = initial_masks(DSLTHLearner(make_cfg(seed=4), SHAPE, K, partition_id=0))
    assert not any(torch.equal(ma[k], other[k]) for k in ma)  # another seed, another mask
    # nodes with their own keep ratios threshold the same draws: nested masks
    cfg = make_cfg(dslth_keep_ratios="0.2/0.5,0.6/0.95")
    low = initial_masks(DSLTHLearner(cfg, SHAPE, K, partition_id=0))
    high = initial_masks(DSLTHLearner(cfg, SHAPE, K, partition_id=1))
    assert all(bool((low[k] <= high[k]).all()) and not torch.equal(low[k], high[k]) for k in low)


def test_fixed_weights_do_not_change_during_training():
    learner = DSLTHLearner(make_cfg(dslth_group_lasso=1e-3), SHAPE, K)
    before = weights(learner)
    scores_before = learner.net.features[0].scores.detach().clone()
    learner.absorb(peers(DSLTHLearner(make_cfg(), SHAPE, K, partition_id=1).shared_payload()))
    metrics = learner.fit(make_data())
    assert {"l_ce", "l_group_lasso"} <= set(metrics)
    after = weights(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(scores_before, learner.net.features[0].scores.detach())
    assert [n for n, _ in learner.net.named_parameters()] == [
        f"{n}.scores" for n in learner.net.masked_layers()
    ]


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 1.0])
def test_top_r_keeps_exact_fraction_of_fused_scores_per_layer(ratio):
    learner = DSLTHLearner(
        make_cfg(dslth_keep_ratio_conv=ratio, dslth_keep_ratio_fc=ratio), SHAPE, K
    )
    for layer in learner.net.masked_layers().values():
        mask = layer.binary_mask()
        n = mask.numel()
        assert int(mask.sum()) == max(1, n - math.floor((1 - ratio) * n))
        z = layer.scores.detach()
        y = (z + z.abs().mean() * z.sign() * layer.neighbour_mean).abs()
        if (~mask).any():
            assert y[mask].min() >= y[~mask].max()  # the largest |y| are the kept ones


def test_straight_through_gradients_reach_all_scores():
    learner = DSLTHLearner(make_cfg(), SHAPE, K)
    data = make_data()
    loss = torch.nn.functional.cross_entropy(learner.net(data.x_train), data.y_train)
    loss.backward()
    for layer in learner.net.masked_layers().values():
        grad = layer.scores.grad
        assert grad is not None and torch.isfinite(grad).all()
        dropped = ~layer.binary_mask()
        if dropped.any():
            assert grad[dropped].abs().sum() > 0  # masked-out entries learn too (STE)
        assert layer.weight.grad is None


def received_masks(partitions=(1, 2)):
    payloads = [
        DSLTHLearner(make_cfg(), SHAPE, K, partition_id=p).shared_payload() for p in partitions
    ]
    return [from_array_record(to_array_record(p)) for p in payloads]  # through Flower types


def test_absorbing_masks_never_changes_the_scores():
    """The fusion is recomputed in every forward pass; it must not be written into z."""
    node = DSLTHLearner(make_cfg(), SHAPE, K, partition_id=0)
    wire = received_masks()
    scores = {n: m.scores.detach().clone() for n, m in node.net.masked_layers().items()}
    node.absorb(peers(*wire))
    for name, layer in node.net.masked_layers().items():
        assert torch.equal(layer.scores.detach(), scores[name])
        shape = layer.scores.shape
        masks = torch.stack([unpack_bits(p[f"mask.{name}"], shape) for p in wire]).float()
        assert torch.equal(layer.neighbour_mean, masks.mean(0))
    # ... and the mask does follow the received ones: y = z + mean|z| sign(z) m_bar
    layer = node.net.features[0]
    z = layer.scores.detach()
    y = z + z.abs().mean() * z.sign() * layer.neighbour_mean
    top = torch.zeros(y.numel())
    top[y.abs().flatten().topk(layer.num_kept).indices] = 1
    assert torch.equal(layer.binary_mask().flatten().float(), top)


def test_released_round_is_one_sgd_step_then_masked_finetuning():
    cfg = make_cfg(batch_size=16)
    node = DSLTHLearner(cfg, SHAPE, K)
    layer = node.net.features[0]
    z0 = layer.scores.detach().clone()
    node.fit(make_data())
    g = layer.last_grad.clone()
    assert g.abs().sum() > 0
    # exactly one SGD step: z1 = z0 - lr (g + wd z0)
    expected = z0 - cfg.options(DSLTHOptions).score_lr * (
        g + cfg.options(DSLTHOptions).weight_decay * z0
    )
    assert torch.allclose(layer.scores.detach(), expected, atol=1e-6)
    z1 = layer.scores.detach().clone()
    node.absorb(peers(*received_masks()))
    # fine-tuning with the new masks: z <- z - 10 g m_bar_new
    expected = z1 - cfg.options(DSLTHOptions).finetune_scale * g * layer.neighbour_mean
    assert torch.allclose(layer.scores.detach(), expected, atol=1e-6)


def test_a_node_is_scored_after_the_finetuning_step_with_the_new_masks():
    """The release scores each client after update_localpop (the fine-tuning with the
    masks just received). Here those masks arrive at the start of the next round, so with
    ``scored-at = "release"`` a node's round (absorb -> fit -> evaluate, as the ClientApp
    runs it) must score the model absorb left, not the one fit's SGD step has just made."""
    cfg = make_cfg(dslth_scored_at="release")
    node = DSLTHLearner(cfg, SHAPE, K)
    data = make_data(n=64)
    node.fit(data)  # round 1's step
    before_finetune = DSLTHLearner(cfg, SHAPE, K)
    before_finetune.load_bytes(node.to_bytes())
    node.absorb(peers(*received_masks()))  # round 2: the new masks, the fine-tuning step
    finetuned = DSLTHLearner(cfg, SHAPE, K)
    finetuned.load_bytes(node.to_bytes())
    node.fit(data)  # round 2's step
    stepped = DSLTHLearner(cfg, SHAPE, K)
    stepped.load_bytes(node.to_bytes())

    scored: list[torch.Tensor] = []  # the logits evaluate sees: local test, then global
    predict = node.predict

    def recording_predict(x: torch.Tensor) -> torch.Tensor:
        scored.append(predict(x))
        return scored[-1]

    node.predict = recording_predict
    metrics = node.evaluate(data)
    x_local, x_global = data.x_local_test, data.x_global_test
    assert torch.equal(scored[0], finetuned.predict(x_local))
    assert torch.equal(scored[1], finetuned.predict(x_global))
    assert metrics == finetuned.evaluate(data)
    # the three models differ, so the test tells the scoring points apart
    assert not torch.equal(finetuned.predict(x_global), stepped.predict(x_global))
    assert not torch.equal(finetuned.predict(x_global), before_finetune.predict(x_global))
    # scoring changes nothing: the next round trains on from the stepped model
    for name, layer in node.net.masked_layers().items():
        assert torch.equal(layer.scores, stepped.net.masked_layers()[name].scores)
    assert torch.equal(predict(x_global), stepped.predict(x_global))
    # without a fit since the last absorb (an evaluation message), the current model
    node.absorb(peers(*received_masks()))
    scored.clear()
    node.evaluate(data)
    assert torch.equal(scored[1], predict(x_global))


def test_by_default_a_node_is_scored_on_what_its_training_produced():
    """In a comparison every method is scored after the same local rounds: by default
    DSLTH scores the model its round's training step produced, not the one before it."""
    cfg = make_cfg()
    node = DSLTHLearner(cfg, SHAPE, K)
    data = make_data(n=64)
    node.fit(data)
    node.absorb(peers(*received_masks()))
    finetuned = DSLTHLearner(cfg, SHAPE, K)
    finetuned.load_bytes(node.to_bytes())
    node.fit(data)
    stepped = DSLTHLearner(cfg, SHAPE, K)
    stepped.load_bytes(node.to_bytes())
    assert node.evaluate(data) == stepped.evaluate(data)
    x_global = data.x_global_test
    assert not torch.equal(finetuned.predict(x_global), stepped.predict(x_global))


def test_an_isolated_node_fuses_with_no_mask():
    """The no-sharing control trains a plain supermask: m_bar = 0, so the fused scores
    are the node's own (a frozen random initial m_bar would keep steering its mask)."""
    shared = DSLTHLearner(make_cfg(), SHAPE, K)
    isolated = DSLTHLearner(make_cfg(isolated=True), SHAPE, K)
    for name, layer in isolated.net.masked_layers().items():
        assert not layer.neighbour_mean.any()
        assert shared.net.masked_layers()[name].neighbour_mean.any()
        assert torch.equal(layer.scores, shared.net.masked_layers()[name].scores)


def test_scores_stay_bounded_and_masks_keep_moving_on_a_ring():
    """The reviewed bug: fusion written into the scores grew mean |z| ~1.5x per round and
    froze the masks. With fusion as a view, 15 rounds on a 2-node ring stay bounded."""
    cfg = make_cfg(dslth_procedure="epochs", local_epochs=1)
    nodes = [DSLTHLearner(cfg, SHAPE, K, partition_id=p) for p in (0, 1)]
    data = [make_data(seed=p) for p in (0, 1)]
    start = nodes[0].mask_health()["health_score_abs_mean"]
    flips = []
    for round_index in range(15):
        sent = [n.shared_payload() for n in nodes]
        for i, node in enumerate(nodes):
            node.absorb(peers(sent[1 - i]))
            metrics = node.fit(data[i])
        assert ("health_bits_flipped" in metrics) == (round_index > 0)  # none before a send
        flips.append(metrics.get("health_bits_flipped", 0.0))
        assert 0.0 <= metrics["health_mask_overlap"] <= 1.0
    end = metrics["health_score_abs_mean"]
    assert end < 3 * start, (start, end)
    assert sum(f > 0 for f in flips[-5:]) >= 3  # masks still change late in the run


def test_malformed_payloads_are_rejected_without_change():
    learner = DSLTHLearner(make_cfg(), SHAPE, K)
    good = DSLTHLearner(make_cfg(), SHAPE, K, partition_id=1).shared_payload()
    key = "mask.features.0"
    state = learner.to_bytes()
    bad_payloads = {  # missing and unknown entries: tests/test_method_contract.py
        "dtype": {**good, key: good[key].float()},
        "length": {**good, key: good[key][:-1]},
        "rank": {**good, key: good[key].view(1, -1)},
    }
    for name, bad in bad_payloads.items():
        with pytest.raises(PayloadError):
            learner.absorb(peers(good, bad))
        assert learner.to_bytes() == state, name


def test_a_state_saved_under_another_seed_is_refused():
    """Its fixed weights are another run's (the round trip itself is the contract's)."""
    learner = DSLTHLearner(make_cfg(), SHAPE, K)
    learner.fit(make_data())
    blob = learner.to_bytes()
    with pytest.raises(ValueError, match="fixed weights"):
        DSLTHLearner(make_cfg(seed=99), SHAPE, K).load_bytes(blob)


def test_keep_ratio_parsing():
    assert make_cfg().options(DSLTHOptions).node_keep_ratio_list() == []
    assert make_cfg(dslth_keep_ratios="0.2/0.5, 0.4").options(
        DSLTHOptions
    ).node_keep_ratio_list() == [
        (0.2, 0.5),
        (0.4, 0.9),
    ]
    assert keep_ratios_for(make_cfg(dslth_keep_ratios="0.2,0.5").options(DSLTHOptions), 3) == (
        0.5,
        0.9,
    )
    assert keep_ratios_for(make_cfg(dslth_keep_ratio_conv=0.4).options(DSLTHOptions), 3) == (
        0.4,
        0.9,
    )
    for bad in ("0", "1.5", "a,0.3", "0.3/x", "0.3/0"):
        with pytest.raises(ConfigError) as err:
            make_cfg(dslth_keep_ratios=bad)
        assert err.value.key == "dslth.keep-ratios"
    with pytest.raises(ConfigError) as err:
        make_cfg(dslth_keep_ratio_conv=0.0)
    assert err.value.key == "dslth.keep-ratio-conv"


@pytest.mark.parametrize(
    "key, value",
    [
        ("dslth_group_lasso", -1e-3),
        ("dslth_finetune_scale", -1.0),
        ("dslth_score_lr", 0.0),
        ("dslth_procedure", "adam"),
        ("dslth_weight_init", "zeros"),
        ("classifier", "resnet18"),
    ],
)
def test_bad_dslth_config_is_refused_by_run_config(key, value):
    with pytest.raises(ConfigError) as err:
        make_cfg(**{key: value})
    expected = key.replace("_", "-").replace("dslth-", "dslth.", 1)
    assert err.value.key == expected


def test_released_config_runs_on_the_fixed_random_graph():
    """conf/dslth-released.toml: the release's fixed undirected graph (20 nodes, mean
    degree 10.4) stood in for by fixed-random with mean degree 10, and 401 rounds (round
    t + 1 scores the release's round t)."""
    cfg = RunConfig.from_toml(ROOT / "conf" / "dslth-released.toml")
    assert cfg.method == "dslth" and resolved_topology(cfg) == "fixed-random"
    assert cfg.topology_k == 10 and cfg.num_server_rounds == 401
    topology = build_topology(resolved_topology(cfg), k=cfg.topology_k, seed=cfg.seed)
    graph = [topology.in_neighbours(p, 20, set(range(20)) - {p}, 1) for p in range(20)]
    assert sum(map(len, graph)) / 20 == 10
    # so m_bar is a fraction: the mean of ~10 received masks, not a ring's 0 or 1
    node = DSLTHLearner(make_cfg(), SHAPE, K, partition_id=0)
    node.absorb(peers(*received_masks(partitions=graph[0])))
    m_bar = node.net.features[0].neighbour_mean
    assert ((m_bar > 0) & (m_bar < 1)).any()
