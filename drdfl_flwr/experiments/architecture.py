"""``docs/architecture.png``: the relay and the hub, and what every method sends and keeps.

    python -m drdfl_flwr.experiments.architecture                 # writes docs/architecture.png
    python -m drdfl_flwr.experiments.architecture --out fig.png

Drawn with matplotlib's bare ``Figure`` (no pyplot), like :mod:`.plots`. Nothing about a
method is written here: every registered method has a row (:func:`rows`), its name and
what it sends and keeps read from its :class:`~drdfl_flwr.spec.MethodSpec` (``title``,
``sends``, ``keeps``, written beside the method's ``shared_payload`` / ``absorb``) and
whether it runs on the relay or the hub from its reducer (:func:`runs_on`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drdfl_flwr.registry import METHODS, method_spec

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DEFAULT_OUT = Path("docs") / "architecture.png"
PAPERS = ("drdfl", "dfml", "dslth")  # the papers' three methods, drawn first and bold
RELAY_COLOR, HUB_COLOR, NODE_COLOR = "#1f77b4", "#d62728", "#f2f2f2"


@dataclass(frozen=True)
class Row:
    method: str
    title: str
    runs_on: str  # "relay", "hub" or "none" (Local)
    sends: str  # each round, to its ring successor (relay) or to the hub
    keeps: str  # what never leaves the node


GROUPS = ("relay", "none", "hub")  # the table's order: the ring's methods, Local, the hub's


def rows() -> list[Row]:
    """One row per registered method, read from its spec: the relay's methods first (the
    papers' three on top), then Local, then the hub's, each group in registry order."""
    table = []
    for method in METHODS:
        spec = method_spec(method)
        table.append(Row(method, spec.title, runs_on(method), spec.sends, spec.keeps))
    order = list(METHODS)
    return sorted(
        table,
        key=lambda r: (GROUPS.index(r.runs_on), r.method not in PAPERS, order.index(r.method)),
    )


def runs_on(method: str) -> str:
    """``hub`` for a method with a hub reducer, ``none`` for Local, ``relay`` otherwise."""
    if method == "local":
        return "none"
    return "hub" if method_spec(method).centralized else "relay"


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _node(ax: Axes, x: float, y: float, label: str, radius: float = 0.17) -> None:
    from matplotlib.patches import Circle

    ax.add_patch(Circle((x, y), radius, facecolor=NODE_COLOR, edgecolor="0.2", zorder=3))
    ax.text(x, y, label, ha="center", va="center", fontsize=9, zorder=4)


def _arrow(ax: Axes, start, end, color: str, shrink: float = 18, rad: float = 0.0) -> None:
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=13,
            color=color,
            linewidth=1.6,
            shrinkA=shrink,
            shrinkB=shrink,
            connectionstyle=f"arc3,rad={rad}",
            zorder=2,
        )
    )


def _ring(ax: Axes, n: int = 6) -> None:
    """The relay: node i's payload goes to node i + 1 only; the ServerApp forwards."""
    points = [
        (math.cos(math.pi / 2 - 2 * math.pi * k / n), math.sin(math.pi / 2 - 2 * math.pi * k / n))
        for k in range(n)
    ]
    for k, (x, y) in enumerate(points):
        _node(ax, x, y, f"node {k}")
        _arrow(ax, (x, y), points[(k + 1) % n], RELAY_COLOR, rad=-0.25)
    ax.text(
        0,
        0.05,
        "ServerApp = relay\nhands node i+1 the payload\nof node i; never averages",
        ha="center",
        va="center",
        fontsize=9.5,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": RELAY_COLOR},
    )
    ax.set_title(
        "Relay (decentralized): a directed ring, no server\n"
        "each node sends its payload to its successor only",
        fontsize=10,
    )


def _star(ax: Axes, n: int = 6) -> None:
    """The hub: every node sends its shared part up, the hub reduces and sends it back."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (-0.45, -0.2),
            0.9,
            0.4,
            boxstyle="round,pad=0.02",
            facecolor="white",
            edgecolor=HUB_COLOR,
            zorder=3,
        )
    )
    ax.text(
        0,
        0,
        "ServerApp = hub\nreduces the replies",
        ha="center",
        va="center",
        fontsize=9.5,
        zorder=4,
    )
    for k in range(n):
        angle = math.pi / 2 - 2 * math.pi * k / n
        x, y = math.cos(angle), math.sin(angle)
        _node(ax, x, y, f"node {k}")
        inner = (0.5 * x, 0.34 * y)
        _arrow(ax, (x, y), inner, HUB_COLOR, shrink=14, rad=0.12)
        _arrow(ax, inner, (x, y), "0.45", shrink=14, rad=0.12)
    ax.set_title(
        "Hub (centralized baselines): a star\n"
        "nodes send their shared part up (red); the reduction comes back (grey)",
        fontsize=10,
    )


def _diagram_axes(ax: Axes) -> None:
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")


def _table(ax: Axes) -> None:
    from matplotlib.patches import Rectangle

    table = rows()
    ax.axis("off")
    ax.set_xlim(0, 1)
    columns = ((0.0, "method"), (0.12, "runs on"), (0.2, "sends each round"), (0.6, "keeps"))
    widths = {"sends each round": 60, "keeps": 60}
    lines_of = [  # row heights: a margin plus the longer cell's lines
        0.5
        + 0.6
        * max(
            len(_wrap(row.sends, widths["sends each round"]).splitlines()),
            len(_wrap(row.keeps, widths["keeps"]).splitlines()),
        )
        for row in table
    ]
    total = sum(lines_of) + 0.9
    ax.set_ylim(total, 0)
    for x, title in columns:
        ax.text(x + 0.005, 0.4, title, fontsize=9, fontweight="bold", va="center")
    y = 0.8
    colors = {"relay": RELAY_COLOR, "hub": HUB_COLOR, "none": "0.35"}
    for k, (row, lines) in enumerate(zip(table, lines_of, strict=True)):
        if k % 2 == 0:
            ax.add_patch(Rectangle((0, y), 1, lines, facecolor="#e6edf7", edgecolor="none"))
        if row.method in PAPERS:
            ax.add_patch(Rectangle((0, y), 0.004, lines, facecolor="black", edgecolor="none"))
        middle = y + lines / 2
        weight = "bold" if row.method in PAPERS else "normal"
        ax.text(0.01, middle, row.title, fontsize=9.5, va="center", fontweight=weight)
        ax.text(0.125, middle, row.runs_on, fontsize=9.5, va="center", color=colors[row.runs_on])
        ax.text(
            0.205,
            middle,
            _wrap(row.sends, widths["sends each round"]),
            fontsize=9,
            va="center",
            linespacing=1.25,
        )
        ax.text(
            0.605,
            middle,
            _wrap(row.keeps, widths["keeps"]),
            fontsize=9,
            va="center",
            linespacing=1.25,
        )
        y += lines


def architecture_figure(out: Path = DEFAULT_OUT, dpi: int = 110) -> Path:
    """Draw the figure into ``out`` (a PNG); returns ``out``."""
    from matplotlib.figure import Figure

    from drdfl_flwr.experiments.plots import save_png

    fig = Figure(figsize=(11.5, 11.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 1.5))
    ring_ax, star_ax = top.subplots(1, 2)
    _ring(ring_ax)
    _star(star_ax)
    for ax in (ring_ax, star_ax):
        _diagram_axes(ax)
    table_ax = bottom.subplots()
    _table(table_ax)
    bottom.suptitle(
        "What each method sends and what stays on the node (bold: the papers' three "
        "methods; runs on: read from the registry)",
        fontsize=10,
    )
    fig.suptitle(
        "drdfl-flwr: Flower routes every message through its SuperLink; the ServerApp is a "
        "relay or a hub",
        fontsize=11,
    )
    return save_png(fig, Path(out), dpi=dpi)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    print(architecture_figure(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
