"""tracking = "tensorboard" logs every round's metrics and the run config from the place
rounds are recorded, readable back as TensorBoard reads them; off by default."""

from __future__ import annotations

import pytest

from drdfl_flwr.config import ConfigError
from drdfl_flwr.results import ResultsWriter

pytest.importorskip("tensorboard")


def record(r: int) -> dict:
    mean = {"local_t_acc": 0.5 + 0.1 * r, "global_t_acc": 0.3, "health_zl_kl_per_dim": 0.01 * r}
    mean["l_ce"] = 2.0 / r
    return {
        "round": r,
        "mean": mean,
        "std": {"local_t_acc": 0.05, "global_t_acc": 0.01},
        "seconds": 1.5,
    }


def test_every_round_and_the_run_config_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = ResultsWriter(tmp_path, {"method": "drdfl", "tracking": "tensorboard"})
    for r in (1, 2, 3):
        writer.log_round(record(r))
    writer.finish()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    local = [(e.step, round(e.value, 4)) for e in events.Scalars("accuracy/local_t_acc")]
    assert local == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert [e.step for e in events.Scalars("health/zl_kl_per_dim")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/l_ce")] == [1, 2, 3]
    assert "run_config/text_summary" in events.Tags()["tensors"]


def test_off_by_default_writes_nothing(tmp_path):
    writer = ResultsWriter(tmp_path, {"method": "drdfl"})
    writer.log_round(record(1))
    writer.finish()
    assert not (tmp_path / "tensorboard").exists()


def test_a_bad_tracking_value_is_refused_by_name():
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="tracking"):
        make_config(method="drdfl", tracking="wandb")
