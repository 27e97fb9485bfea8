"""What a device installs, with and without the simulation engine (issue 31, item 4).

    python benchmarks/install_size.py

A SuperNode runs the ClientApp and nothing else: it needs Flower, torch and the data
libraries, not Ray, which only Flower's simulation engine uses. The project's core
dependencies leave Ray out; the ``simulation`` extra (``pip install ".[simulation]"``, part
of ``dev``) adds it. This walks the installed packages' own metadata from ``drdfl-flwr``
down (markers evaluated for this interpreter, with and without the extra) and adds up the
bytes each distribution's RECORD lists, so it measures what pip installs here without
installing anything. Prints the two totals, Ray's share, and the largest packages.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """Every installed distribution ``root[extras]`` pulls in, itself included."""
    done: dict[str, set[str]] = {}  # distribution -> the extras whose requirements are in
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency not installed here
        new = {""} - done.get(key, set()) | set(wanted) - done.get(key, set())
        if not new:
            continue
        done.setdefault(key, set()).update(new)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in new):
                todo.append((req.name, tuple(req.extras)))
    return set(done)


def size_of(name: str) -> int:
    files = distribution(name).files or []
    return sum(f.size or 0 for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    device = closure("drdfl-flwr", ())
    simulation = closure("drdfl-flwr", ("simulation",))
    extra = simulation - device
    mb = 1024**2
    total_device = sum(size_of(n) for n in device)
    total_simulation = sum(size_of(n) for n in simulation)
    print(f"device install (drdfl-flwr): {len(device)} packages, {total_device / mb:,.0f} MiB")
    print(
        f"with the simulation extra (drdfl-flwr[simulation]): {len(simulation)} packages, "
        f"{total_simulation / mb:,.0f} MiB"
    )
    print(
        f"the extra adds {len(extra)} packages, {(total_simulation - total_device) / mb:,.0f} "
        f"MiB: {', '.join(sorted(extra))}"
    )
    largest = sorted(device, key=size_of, reverse=True)[: args.top]
    print("largest on a device: " + ", ".join(f"{n} {size_of(n) / mb:,.0f} MiB" for n in largest))


if __name__ == "__main__":
    main()
