"""Split a dataset into per-device folders with the project's partitioners, so that a
trial on real devices starts from files (as Flower's embedded-devices example does):

    python -m drdfl_flwr.experiments.presplit --num-partitions 3 --out devices \\
        --set 'dataset="cifar10" data-dir="data/cifar10" partitioner="shard" classes-per-client=5'

writes ``devices/node-<k>/train.parquet`` (partition k of the training split, as a
simulated node would train on it) and ``devices/node-<k>/test.parquet`` (its Local-T: test
samples dealt out in proportion to its training classes), and ``devices/global-test/
test.parquet`` (the union, the run's Global-T), all in the hub's parquet layout with the
dataset's own columns. Copy ``node-<k>`` to device k and start its SuperNode with
``own-data`` naming it (docs/devices.md); the run's ``dataset`` must be the one split here.
``--set`` takes the run config's data keys as the grid runner's ``--set`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from drdfl_flwr.config import ConfigError, RunConfig
from drdfl_flwr.data import _partition_plan, _splits, check_partition_plan, dataset_spec
from drdfl_flwr.experiments.__main__ import SetError, parse_overrides
from drdfl_flwr.own_data import GLOBAL_TEST_KEY


def presplit(cfg: RunConfig, num_partitions: int, out: Path) -> list[tuple[int, int, int]]:
    """Write the folders; returns (partition, training samples, test samples) per node."""
    counts = check_partition_plan(cfg, num_partitions)  # a plan that cannot be drawn: here
    plan = _partition_plan(cfg, num_partitions)
    _, test = _splits(cfg)
    written = []
    for partition in range(num_partitions):
        folder = out / f"node-{partition}"
        folder.mkdir(parents=True, exist_ok=True)
        train = plan.partitioner.load_partition(partition)
        local = test.select(plan.local_test_indices[partition].tolist())
        train.to_parquet(str(folder / "train.parquet"))
        local.to_parquet(str(folder / "test.parquet"))
        written.append((partition, len(train), len(local)))
        assert len(train) == int(counts[partition].sum())
    common = out / GLOBAL_TEST_KEY
    common.mkdir(parents=True, exist_ok=True)
    union = np.concatenate(plan.local_test_indices).tolist()
    test.select(union).to_parquet(str(common / "test.parquet"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-partitions", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for node-<k>/ folders")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='the run\'s data keys, e.g. \'dataset="cifar10" partitioner="shard"\'',
    )
    args = parser.parse_args(argv)
    try:
        if args.num_partitions < 1:
            raise ConfigError("--num-partitions", args.num_partitions, "must be at least 1")
        cfg = RunConfig.from_run_config(parse_overrides(args.set))
        rows = presplit(cfg, args.num_partitions, args.out)
    except (ConfigError, SetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spec = dataset_spec(cfg)
    for partition, n_train, n_test in rows:
        print(f"{args.out / f'node-{partition}'}: {n_train} training, {n_test} test samples")
    print(
        f"{args.out / GLOBAL_TEST_KEY}: {sum(r[2] for r in rows)} test samples "
        f"({cfg.dataset}: columns {spec.image_column!r}, {spec.label_column!r})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
