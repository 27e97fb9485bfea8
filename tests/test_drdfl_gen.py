"""DRDFL-Gen (our extension): the decoder travels and is merged like the Learngene,
generated samples follow the requested class mix and come from the received statistics,
private modules never leave the node, and the paper's DRDFL is left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from drdfl_flwr.config import ConfigError
from drdfl_flwr.data import ClientData
from drdfl_flwr.methods.drdfl_gen import class_mix_probabilities, image_grid
from drdfl_flwr.payload import PayloadError, peers
from drdfl_flwr.registry import build_learner
from drdfl_flwr.results import ResultsWriter
from tests.conftest import make_config, random_client_data

SHAPE, K = (1, 8, 8), 10


def make(partition_id: int = 0, **section):
    cfg = make_config(method="drdfl-gen").with_values(
        {f"drdfl-gen.{k.replace('_', '-')}": v for k, v in section.items()}
    )
    return build_learner(cfg, SHAPE, K, partition_id)


def trained_peer(seed: int = 1):
    """Another node's learner after a round of its own training (its decoder differs)."""
    peer = make(partition_id=seed)
    peer.fit(random_client_data(seed=seed))
    return peer


def test_the_decoder_travels_and_replaces_the_own_one():
    node, peer = make(), trained_peer()
    payload = peer.shared_payload()
    assert any(k.startswith("decoder.") for k in payload)
    node.absorb(peers(payload))
    for key, value in node.decoder.state_dict().items():
        assert torch.equal(value, payload[f"decoder.{key}"]), key


def test_the_decoder_is_averaged_when_the_learngene_is():
    cfg = make_config(method="drdfl-gen", drdfl_learngene_merge="average")
    node = build_learner(cfg, SHAPE, K, 0)
    own = {k: v.clone() for k, v in node.decoder.state_dict().items()}
    payload = trained_peer().shared_payload()
    node.absorb(peers(payload))
    for key, value in node.decoder.state_dict().items():
        assert torch.allclose(value, (own[key] + payload[f"decoder.{key}"]) / 2), key


def test_the_papers_drdfl_keeps_its_decoder_private():
    paper = build_learner(make_config(method="drdfl"), SHAPE, K)
    assert not any(k.startswith("decoder.") for k in paper.shared_payload())


@pytest.mark.parametrize(
    ("mix", "expected"),
    [
        ("uniform", [0.1] * 10),
        ("absent", [0, 0, 0, 0, 0, 0, 0.25, 0.25, 0.25, 0.25]),
        ("local", [0.4, 0.2, 0.1, 0.1, 0.1, 0.1, 0, 0, 0, 0]),
    ],
)
def test_generated_labels_follow_the_class_mix(mix, expected):
    counts = torch.tensor([40, 20, 10, 10, 10, 10, 0, 0, 0, 0])
    assert class_mix_probabilities(mix, counts).tolist() == pytest.approx(expected)
    node = make(class_mix=mix)
    labels = node.draw_labels(20_000, counts, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=K).float() / len(labels)
    assert freq.tolist() == pytest.approx(expected, abs=0.015)


def test_absent_mix_on_a_node_with_every_class_is_uniform():
    probs = class_mix_probabilities("absent", torch.full((K,), 5))
    assert probs.tolist() == pytest.approx([0.1] * K)


def test_training_draws_its_generated_classes_from_the_mix(monkeypatch):
    """Only classes the node lacks are generated under ``absent``, from round
    ``start-round`` on, and the loss on them reaches the classifier."""
    node = make(class_mix="absent", start_round=2)
    data = random_client_data()
    data = type(data)(
        data.x_train,
        data.y_train % 4,  # the node holds classes 0..3 only
        data.x_local_test,
        data.y_local_test % 4,
        data.x_global_test,
        data.y_global_test,
        K,
    )
    drawn: list[torch.Tensor] = []
    original = node.generate

    def spy(labels, generator=None):
        if generator is None:  # training draws (health uses a seeded generator)
            drawn.append(labels.clone())
        return original(labels, generator)

    monkeypatch.setattr(node, "generate", spy)
    first = node.fit(data)
    assert not drawn and "l_gen" not in first  # round 1: the decoder learns first
    second = node.fit(data)
    labels = torch.cat(drawn)
    assert second["l_gen"] > 0
    assert set(labels.tolist()) <= set(range(4, K))
    freq = torch.bincount(labels, minlength=K)[4:].float() / len(labels)
    assert freq.min() > 0.05  # every absent class is drawn


def test_generation_uses_the_received_statistics_for_this_round_only():
    node, peer = make(), trained_peer()
    payload = peer.shared_payload()
    payload["stats.mu"] = payload["stats.mu"] + 100.0  # far from the node's own
    node.absorb(peers(payload))
    mu, _ = node.generation_stats()
    assert torch.equal(mu, payload["stats.mu"])
    node.fit(random_client_data())
    mu_after, _ = node.generation_stats()
    assert torch.equal(mu_after, node.stats.mu.detach())  # used up; own stats next round


def test_an_isolated_node_generates_from_its_own_statistics():
    node = make()
    mu, var = node.generation_stats()
    assert torch.equal(mu, node.stats.mu.detach())
    assert torch.equal(var, node.stats.variance().detach())


def test_a_payload_without_the_decoder_is_refused_and_changes_nothing():
    node, peer = make(), trained_peer()
    payload = {k: v for k, v in peer.shared_payload().items() if not k.startswith("decoder.")}
    before = node.to_bytes()
    with pytest.raises(PayloadError, match="decoder"):
        node.absorb(peers(payload))
    assert node.to_bytes() == before and node.received_stats is None


def test_health_reports_generated_accuracy_on_absent_and_present_classes():
    node = make()
    data = random_client_data()
    data = type(data)(
        data.x_train,
        data.y_train % 3,
        data.x_local_test,
        data.y_local_test % 3,
        data.x_global_test,
        data.y_global_test,
        K,
    )
    metrics = node.fit(data)
    assert 0.0 <= metrics["health_gen_absent_acc"] <= 1.0
    assert 0.0 <= metrics["health_gen_present_acc"] <= 1.0


def test_wrong_extension_values_are_named():
    with pytest.raises(ConfigError, match="drdfl-gen.class-mix"):
        make(class_mix="rare")
    with pytest.raises(ConfigError, match="drdfl-gen.start-round"):
        make(start_round=0)
    with pytest.raises(ConfigError, match="drdfl-gen.decoder-input"):
        make(decoder_input="both")


def test_sample_grid_is_one_row_per_class_and_reaches_the_results_folder(tmp_path: Path):
    node = make()
    grid = node.artifacts()["generated"]
    per_class = 80 // K
    assert grid.dtype == torch.uint8
    assert tuple(grid.shape) == (K * 9 + 1, per_class * 9 + 1, 1)
    writer = ResultsWriter(tmp_path / "run", {})
    writer.save_artifacts(2, {"generated": grid.numpy(), "junk": np.zeros((3, 3), np.float32)})
    assert (tmp_path / "run" / "artifacts" / "generated_partition2.png").is_file()
    assert not list((tmp_path / "run" / "artifacts").glob("junk*"))


def test_image_grid_places_tiles_row_major():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 1.0, -1.0)])
    grid = image_grid(images, columns=2)
    assert grid.shape == (7, 7, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 255 and grid[4, 1, 0] == 0


def brightness_coded(classes: list[int], n: int, seed: int):
    """8x8 images whose brightness encodes the label: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=gen)]
    x = (y.float() / (K - 1) * 2 - 1)[:, None, None, None]
    x = x + 0.05 * torch.randn(n, *SHAPE, generator=gen)
    return x.clamp(-1, 1), y


def test_received_knowledge_reaches_the_classifier_for_classes_the_node_lacks():
    """The mechanism: a node holding classes 0-4 that receives the decoder and statistics
    of a node trained on 5-9 learns to name real images of 5-9; its isolated twin,
    whose classifier only ever saw 0-4, names none of them."""
    x_teacher, y_teacher = brightness_coded(list(range(5, 10)), 256, 0)
    teacher = make(partition_id=1)
    for _ in range(10):
        teacher.fit(ClientData(x_teacher, y_teacher, x_teacher, y_teacher, x_teacher, y_teacher, K))
    x_own, y_own = brightness_coded(list(range(5)), 256, 1)
    x_absent, y_absent = brightness_coded(list(range(5, 10)), 256, 2)
    data = ClientData(x_own, y_own, x_own[:32], y_own[:32], x_absent, y_absent, K)
    accuracy = {}
    for mode in ("shared", "isolated"):
        node = make(partition_id=0, class_mix="absent", start_round=1)
        for _ in range(3):
            if mode == "shared":
                node.absorb(peers(teacher.shared_payload()))
            node.fit(data)
        accuracy[mode] = node.accuracy(x_absent, y_absent)
    assert accuracy["isolated"] == 0.0
    assert accuracy["shared"] > 0.1
