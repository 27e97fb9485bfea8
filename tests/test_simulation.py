"""End to end through Flower's Ray simulation engine on a slice of real CIFAR-10."""

from __future__ import annotations

import json

import pytest

from drdfl_flwr.config import RunConfig
from drdfl_flwr.simulation import simulate
from tests.conftest import CIFAR10_DIR

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        not (CIFAR10_DIR / "train.parquet").is_file(),
        reason=f"real CIFAR-10 parquet files not found at {CIFAR10_DIR} (../shared/datasets)",
    ),
]


# A health metric each method must report per node once a neighbour's payload is in.
HEALTH_AFTER_RECEIPT = {
    "drdfl": "health_rec_gap_zl",
    "dfml": "health_kl_to_received",
    "dslth": "health_mask_overlap",
}


@pytest.mark.parametrize("method", ["drdfl", "dfml", "dslth"])
def test_ring_run_on_cifar10_slice(method, tmp_path):
    cfg = RunConfig(
        method=method,
        dataset="cifar10",
        data_dir=str(CIFAR10_DIR),
        subset_train=300,
        subset_test=150,
        num_server_rounds=2,
        local_epochs=1,
        batch_size=32,
        results_dir=str(tmp_path),
        run_name=method,
    )
    summary = simulate(cfg, num_clients=3)
    run_dir = tmp_path / method
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(record["nodes"]) == ["0", "1", "2"]
        assert record["failed"] == []
        for node in record["nodes"].values():
            assert node["bytes_sent"] > 0 and 0.0 <= node["local_t_acc"] <= 1.0
    # round 2: every node received exactly one payload (its predecessor's) and accepted it
    assert all(n["payloads_received"] == 1.0 for n in rounds[1]["nodes"].values())
    assert all(n["payloads_rejected"] == 0.0 for n in rounds[1]["nodes"].values())
    # the mechanism's health travels from every node into the record and the summary
    health_key = HEALTH_AFTER_RECEIPT[method]
    assert all(health_key in n for n in rounds[1]["nodes"].values())
    assert health_key in summary["last_health"]
    assert summary["last"]["round"] == 2
    assert (run_dir / "convergence.png").stat().st_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2


def test_a_partition_plan_that_cannot_be_drawn_stops_the_run_before_ray_starts(monkeypatch):
    """Before: every ClientApp raised flwr-datasets' 'max number of attempts' on its own
    and the run ended 'complete' with nothing trained. Now the plan is drawn once, first,
    and the error names the partitioner, the count and what to change."""
    import drdfl_flwr.simulation as simulation
    from drdfl_flwr.config import ConfigError, RunConfig

    def no_ray(**kwargs):
        raise AssertionError("the simulation started although the plan cannot be drawn")

    monkeypatch.setattr(simulation, "run_simulation", no_ray)
    cfg = RunConfig(dataset="digits", partitioner="dirichlet", dirichlet_beta=0.05)
    with pytest.raises(ConfigError, match="cannot draw 100 partitions of digits") as err:
        simulation.simulate(cfg, num_clients=100)
    assert "raise dirichlet-beta" in str(err.value) and "'partitioner'" in str(err.value)
