"""A Dirichlet label skew that works at any number of clients (``partitioner =
"dirichlet-client"``).

flwr-datasets' ``DirichletPartitioner`` draws, for every class, how that class's samples
are shared among the clients (Yurochkin et al. 2019); at 1,000 clients and beta 0.1 most
clients draw next to nothing of every class, some draw nothing at all, and it gives up
("The max number of attempts (10) was reached"). Here each *client* draws its class mix
q_m ~ Dir(beta * 1_K) and holds N / M samples drawn by it (Hsu et al. 2019, "Measuring
the effects of non-identical data distribution"; FedLab's balanced Dirichlet split), so
every client holds data whatever M and beta are. When a class runs out, the client's
remaining draws go to the classes left, in proportion to its q_m. Clients are filled in
a random order (so that no partition id is the one always left with the leftovers).
Small beta: one or two classes per client; large beta: close to IID.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


def client_dirichlet_indices(
    labels: np.ndarray, num_partitions: int, beta: float, seed: int
) -> list[np.ndarray]:
    """Sample indices of every partition: ``len(labels) // num_partitions`` each (the
    first ``len % num_partitions`` one more), class mix drawn per client."""
    if num_partitions < 1 or len(labels) < num_partitions:
        raise ValueError(f"{len(labels)} samples cannot be split over {num_partitions} clients")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    pools = [rng.permutation(np.flatnonzero(inverse == k)) for k in range(len(classes))]
    left = np.array([len(p) for p in pools])
    taken = np.zeros(len(classes), dtype=np.int64)
    sizes = np.full(num_partitions, len(labels) // num_partitions)
    sizes[: len(labels) % num_partitions] += 1
    mixes = rng.dirichlet(np.full(len(classes), beta), size=num_partitions)
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_partitions
    for partition in rng.permutation(num_partitions):
        counts = np.zeros(len(classes), dtype=np.int64)
        need = int(sizes[partition])
        while need > 0:
            room = left - counts
            weights = mixes[partition] * (room > 0)
            if weights.sum() <= 0:  # its classes are spent: the classes left, by size
                weights = room.astype(float)
            draw = np.minimum(rng.multinomial(need, weights / weights.sum()), room)
            counts += draw
            need -= int(draw.sum())
        parts = [pools[k][taken[k] : taken[k] + counts[k]] for k in range(len(classes))]
        taken += counts
        left -= counts
        out[partition] = np.sort(np.concatenate(parts))
    return out


def client_dirichlet_partitioner(
    num_partitions: int, label_column: str, beta: float, seed: int
) -> Partitioner:
    """:func:`client_dirichlet_indices` as a flwr-datasets partitioner."""
    from flwr_datasets.partitioner import Partitioner

    class ClientDirichletPartitioner(Partitioner):
        def __init__(self) -> None:
            super().__init__()
            self._indices: list[np.ndarray] | None = None

        @property
        def num_partitions(self) -> int:
            return num_partitions

        def load_partition(self, partition_id: int) -> Dataset:
            if self._indices is None:
                labels = np.asarray(self.dataset[label_column])
                self._indices = client_dirichlet_indices(labels, num_partitions, beta, seed)
            return self.dataset.select(self._indices[partition_id].tolist())

    return ClientDirichletPartitioner()
