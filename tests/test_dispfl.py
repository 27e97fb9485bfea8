"""DisPFL: ERK masks, common initialisation, masked neighbour average, prune and regrow."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.dispfl import (
    MASK_PREFIX,
    VALUES_PREFIX,
    DisPFLLearner,
    DisPFLOptions,
    decode_payload,
    encode_payload,
    erk_densities,
    kept_count,
    prune_and_regrow,
)
from drdfl_flwr import registry
from drdfl_flwr.bitpack import packed_length
from drdfl_flwr.config import ConfigError
from drdfl_flwr.payload import PayloadError, peers
from drdfl_flwr.records import from_array_record, to_array_record
from tests.conftest import make_config, random_client_data

SHAPE = (1, 8, 8)
K = 10
ROUNDS = 6


def make_learner(partition_id: int = 0, **kw) -> DisPFLLearner:
    base = {
        "method": "dispfl",
        "device": "cpu",
        "batch_size": 16,
        "local_epochs": 1,
        "seed": 11,
        "num_server_rounds": ROUNDS,
    }
    torch.manual_seed(500 + partition_id)  # the global RNG must not matter
    return DisPFLLearner(make_config(**{**base, **kw}), SHAPE, K, partition_id=partition_id)


def params(node: DisPFLLearner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in node.classifier.named_parameters()}


def masks(node: DisPFLLearner, which: str = "current") -> dict[str, torch.Tensor]:
    return {n: m.clone() for n, m in getattr(node.masks, which)().items()}


def snapshot(node: DisPFLLearner) -> dict[str, torch.Tensor]:
    return {
        **{f"w.{k}": v for k, v in params(node).items()},
        **{f"m.{k}": v.clone() for k, v in node.masks.state_dict().items()},
    }


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_density(node: DisPFLLearner) -> None:
    """Exactly floor(density_l * numel) kept per tensor; overall target within one entry per
    tensor."""
    current = masks(node)
    for name, mask in current.items():
        assert int(mask.sum()) == kept_count(node.densities[name], mask.numel()), name
    kept = sum(int(m.sum()) for m in current.values())
    total = sum(m.numel() for m in current.values())
    assert abs(kept - node.opts.density * total) <= len(current)
    assert node.density() == pytest.approx(kept / total)


# -- config ----------------------------------------------------------------------------------
def test_registered_decentralized_with_release_defaults():
    spec = registry.method_spec("dispfl")
    assert spec.reducer is None
    opts = make_config(method="dispfl").options(DisPFLOptions)
    assert (opts.density, opts.anneal, opts.erk_power, opts.regrow, opts.different_initial) == (
        0.5,
        0.5,
        1.0,
        "gradient",
        True,
    )
    for key, value in [("density", 0.0), ("anneal", 1.5), ("regrow", "magnitude")]:
        with pytest.raises(ConfigError, match=f"dispfl.{key}"):
            make_config(method="dispfl", **{f"dispfl_{key}": value})


# -- ERK -------------------------------------------------------------------------------------
def test_erk_densities_follow_the_formula_and_the_overall_target():
    shapes = dict(make_learner().shapes)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    for density in (0.1, 0.3, 0.5):
        d = erk_densities(shapes, density)
        assert all(0.0 < v <= 1.0 for v in d.values())
        assert sum(d[n] * numel[n] for n in shapes) == pytest.approx(density * sum(numel.values()))
        # small tensors are denser than large ones
        assert d["features.0.weight"] > d["head.0.weight"] > d["features.4.weight"]
        assert d["features.0.bias"] == 1.0  # sum/prod = 1 for vectors: dense
        sparse = [n for n in shapes if d[n] < 1.0]
        raw = {n: sum(shapes[n]) / numel[n] for n in sparse}
        eps = {d[n] / raw[n] for n in sparse}
        assert max(eps) == pytest.approx(min(eps))  # one eps for every sparse tensor
        assert all(raw[n] <= 1.0 / min(eps) + 1e-12 for n in sparse)


def test_erk_makes_overflowing_layers_dense_and_resolves_eps():
    shapes = {"small": (4, 4), "large": (100, 100)}  # raw 0.5 and 0.02
    d = erk_densities(shapes, 0.5)
    # eps * 0.5 would exceed 1 at eps = 0.5 * 10016 / (0.5 * 16 + 0.02 * 10000) ~ 24
    assert d["small"] == 1.0
    assert d["large"] == pytest.approx((0.5 * 10016 - 16) / 10000)
    assert erk_densities(shapes, 1.0) == {"small": 1.0, "large": 1.0}
    uniform = erk_densities(shapes, 0.3, power=0.0)  # --uniform
    assert uniform == pytest.approx({"small": 0.3, "large": 0.3})


# -- initialisation --------------------------------------------------------------------------
def test_common_initialisation_and_own_erk_masks():
    a, b = make_learner(0), make_learner(1)
    for node in (a, b):
        check_density(node)
        current, w = masks(node), params(node)
        for name in w:
            assert torch.equal(masks(node, "sent")[name], current[name])
            assert (w[name][~current[name]] == 0).all()
    ma, mb, wa, wb = masks(a), masks(b), params(a), params(b)
    assert not torch.equal(ma["features.4.weight"], mb["features.4.weight"])  # own masks
    for name in wa:
        both = ma[name] & mb[name]
        assert torch.equal(wa[name][both], wb[name][both])  # ONE common initialisation
    c, d = (
        make_learner(0, dispfl_different_initial=False),
        make_learner(3, dispfl_different_initial=False),
    )
    assert same(masks(c), masks(d))


# -- prune and regrow ------------------------------------------------------------------------
def test_prune_drops_smallest_weights_and_regrows_largest_scores():
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    weight = torch.tensor([0.5, -0.1, 2.0, 0.05, 0.0, 0.0, 0.0, 0.0])
    score = torch.tensor([9.0, 9.0, 9.0, 0.0, 0.3, 0.9, 0.1, 0.7])
    new = prune_and_regrow(mask, weight, 0.5, score)  # ceil(0.5 * 4) = 2
    # dropped: entries 3 (|0.05|) and 1 (|0.1|); regrown among inactive: 1 (9.0, just dropped,
    # as released) and 5 (0.9)
    assert new.tolist() == [True, True, True, False, False, True, False, False]
    assert int(new.sum()) == 4
    assert torch.equal(prune_and_regrow(mask, weight, 0.0, score), mask)
    dense = torch.ones(6, dtype=torch.bool)  # nothing inactive: the dropped ones return
    assert torch.equal(prune_and_regrow(dense, torch.randn(6), 0.5, torch.rand(6)), dense)


@pytest.mark.parametrize("regrow", ["gradient", "random"])
def test_masks_move_over_rounds_while_density_and_nnz_stay(regrow):
    nodes = [make_learner(i, dispfl_regrow=regrow) for i in range(3)]
    data = [random_client_data(n=32, shape=SHAPE, seed=i) for i in range(3)]
    nnz0 = [{n: int(m.sum()) for n, m in masks(node).items()} for node in nodes]
    first = [masks(node) for node in nodes]
    for t in range(4):  # of T = ROUNDS
        sent = [node.shared_payload() for node in nodes]
        for i, node in enumerate(nodes):
            node.absorb(peers(sent[(i - 1) % 3], sent[(i + 1) % 3]))
            w, current = params(node), masks(node)
            assert all((w[n][~current[n]] == 0).all() for n in w)
            metrics = node.fit(data[i])
            after, trained_under, w = masks(node), masks(node, "sent"), params(node)
            assert same(trained_under, current)
            # weights outside the own (training) mask are exactly 0 after fit
            assert all((w[n][~trained_under[n]] == 0).all() for n in w)
            assert {n: int(m.sum()) for n, m in after.items()} == nnz0[i]
            check_density(node)
            changed = sum(int((after[n] != current[n]).sum()) for n in after)
            total = sum(m.numel() for m in after.values())
            assert metrics["health_mask_changed"] == pytest.approx(changed / total)
            assert metrics["health_density"] == pytest.approx(node.density())
            assert changed > 0  # rate_t > 0 for t < T
            assert metrics["health_drop_rate"] == pytest.approx(
                0.25 * (1 + math.cos(math.pi * t / ROUNDS))
            )
    for node, start in zip(nodes, first, strict=True):
        moved = sum(int((masks(node)[n] != start[n]).sum()) for n in start)
        assert moved > 0.05 * sum(m.numel() for m in start.values())


def test_without_absorb_the_payload_carries_the_mask_the_weights_were_trained_under():
    """A round whose payloads were rejected trains on without absorbing: the weights sent
    must travel under the mask they were trained with, not an older one."""
    node = make_learner()
    data = random_client_data(n=32, shape=SHAPE)
    node.fit(data)
    trained_under = masks(node)  # after round 1's prune/regrow
    node.fit(data)
    sent, w = masks(node, "sent"), params(node)
    assert same(sent, trained_under)
    assert all((w[n][~sent[n]] == 0).all() for n in w)
    decoded = decode_payload(node.shared_payload(), node.shapes)
    assert all(torch.equal(decoded[n][1], w[n][sent[n]]) for n in w)


def test_anneal_zero_keeps_masks_static():
    node = make_learner(dispfl_anneal=0.0)
    before = masks(node)
    node.fit(random_client_data(n=32, shape=SHAPE))
    assert same(before, masks(node))


# -- payload and aggregation -----------------------------------------------------------------
def test_payload_is_packed_mask_and_active_values_only():
    node = make_learner()
    node.fit(random_client_data(n=32, shape=SHAPE))
    payload, sent, w = node.shared_payload(), masks(node, "sent"), params(node)
    names = list(node.shapes)
    assert set(payload) == {MASK_PREFIX + n for n in names} | {VALUES_PREFIX + n for n in names}
    for name, mask in sent.items():
        packed, values = payload[MASK_PREFIX + name], payload[VALUES_PREFIX + name]
        assert packed.dtype == torch.uint8 and packed.numel() == packed_length(mask.numel())
        assert values.dim() == 1 and values.numel() == int(mask.sum())
        assert torch.equal(values, w[name][mask])
    sent_params = sum(t.numel() for t in payload.values())
    nnz = sum(int(m.sum()) for m in sent.values())
    assert sent_params == nnz + sum(packed_length(m.numel()) for m in sent.values())
    assert sent_params < 0.7 * sum(m.numel() for m in sent.values())
    decoded = decode_payload(payload, node.shapes)
    assert all(torch.equal(decoded[n][0], sent[n]) for n in names)
    # through Flower's records, as the relay carries it
    wired = from_array_record(to_array_record(payload))
    other = make_learner(1)
    other.absorb(peers(wired))
    assert other.rounds_trained == 0 and not same(params(other), params(make_learner(1)))


def test_gradient_regrowth_screens_the_dense_gradient_of_one_batch():
    node = make_learner()
    data = random_client_data(n=32, shape=SHAPE)
    scores = node.regrow_scores(data, torch.Generator().manual_seed(3))
    x, y = next(node.batches(data, torch.Generator().manual_seed(3), epochs=1))
    node.classifier.zero_grad()
    torch.nn.functional.cross_entropy(node.classifier(x), y).backward()
    name = "features.4.weight"
    grad = node.classifier.get_parameter(name).grad.abs()
    assert torch.equal(scores[name], grad)
    inactive = ~masks(node)[name]
    assert (scores[name][inactive] > 0).float().mean() > 0.5  # dense: inactive entries too


def test_masked_average_counts_only_the_senders_holding_each_entry():
    node, b, c = make_learner(0), make_learner(1), make_learner(2)
    name = "head.0.weight"
    gen = torch.Generator().manual_seed(0)
    sent, current = node.masks.sent(), node.masks.current()
    e_one, e_none, e_all, e_out = (0, 0), (0, 1), (0, 2), (0, 3)
    for entry, own_sent, own_current in [
        (e_one, False, True),  # re-activated here: only b holds it
        (e_none, False, True),  # nobody holds it
        (e_all, True, True),  # self, b and c hold it
        (e_out, True, False),  # held by all, pruned here
    ]:
        sent[name][entry], current[name][entry] = own_sent, own_current
    with torch.no_grad():
        for n, p in node.classifier.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * sent[n])
    peer_masks = {"b": masks(b), "c": masks(c)}
    for entry, holders in [(e_one, "b"), (e_none, ""), (e_all, "bc"), (e_out, "bc")]:
        for peer, m in peer_masks.items():
            m[name][entry] = peer in holders
    peer_weights = {
        peer: {n: torch.randn(s, generator=gen) for n, s in node.shapes.items()} for peer in "bc"
    }
    payloads = [encode_payload(peer_masks[p], peer_weights[p]) for p in "bc"]
    own_w, own_sent = params(node), masks(node, "sent")
    node.absorb(peers(*payloads))
    w = params(node)[name]
    wb, wc = peer_weights["b"][name], peer_weights["c"][name]
    assert w[e_one] == wb[e_one]  # c lacks the entry: b's value alone
    assert w[e_none] == 0.0
    assert w[e_all] == pytest.approx(float(own_w[name][e_all] + wb[e_all] + wc[e_all]) / 3)
    assert w[e_out] == 0.0
    # every entry of every tensor: mean over the holders, 0 if none, times the own mask
    for n, wn in params(node).items():
        stack = [(own_w[n].double(), own_sent[n])] + [
            (peer_weights[p][n].double() * peer_masks[p][n], peer_masks[p][n]) for p in "bc"
        ]
        total = sum(v for v, _ in stack)
        count = sum(m.double() for _, m in stack)
        expected = torch.where(count > 0, total / count.clamp(min=1), 0.0) * masks(node)[n]
        torch.testing.assert_close(wn.double(), expected, rtol=1e-6, atol=1e-7)
    assert same(masks(node, "sent"), masks(node))  # the weights now live under the own mask


def test_a_mask_of_the_wrong_packed_length_is_refused_and_changes_nothing():
    """(NaN, missing, unknown entries, too few values, the hub's aggregate:
    tests/test_method_contract.py.)"""
    node, other = make_learner(0), make_learner(1)
    node.fit(random_client_data(n=32, shape=SHAPE))  # so that absorb would change things
    good = make_learner(2).shared_payload()
    bad = other.shared_payload()
    key = MASK_PREFIX + "features.4.weight"
    bad[key] = bad[key][:-1]
    before = snapshot(node)
    with pytest.raises(PayloadError, match=key):
        node.receive(peers(good, bad), 1)
    assert same(before, snapshot(node))
