"""Draw the method's figure at build time: where Δ sits in a block, and which positions it touches.

A Sphinx extension: on ``builder-inited`` it writes ``docs/_generated/method_figure.svg`` with matplotlib,
so the picture is code, reviewed like code, and cannot drift from a stale binary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

DELTA = "#d62728"
CHANGED = "#f7b6b2"
PLAIN = "#e8e8e8"
BOX = "#dbe9f6"
N_HEADS, SELECTED = 9, (2, 6)
TOKENS = ["Q", ":", " hot", "\\n", "A", ":"]


def _box(ax, x, y, w, h, text, color=BOX, size=9, c="black"):
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#555", lw=0.8)
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=c)


def _arrow(ax, start, end, color="#555", lw=1.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, color=color, lw=lw))


def block_panel(ax) -> None:
    """Layer L: the residual stream, the attention heads' outputs z (hook_z), Δ added per head, W_O, the MLP."""
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10.6)
    ax.axis("off")
    ax.set_title("Where Δ sits: block L", fontsize=11)
    ax.plot([0.8, 0.8], [0.3, 10.2], color="#888", lw=3, zorder=0)
    ax.text(0.8, 10.35, "residual stream", ha="center", fontsize=8, color="#555")
    _box(ax, 2.0, 0.6, 5.8, 0.8, "LN → Q, K, V → causal attention")
    _arrow(ax, (0.8, 1.0), (2.0, 1.0))
    width = 5.8 / N_HEADS
    for h in range(N_HEADS):
        x = 2.0 + h * width
        _box(ax, x + 0.04, 2.2, width - 0.08, 1.0, f"z$_{h}$", size=8)
        on = h in SELECTED
        label = f"Δ$_{h}$" if on else "0"
        _box(
            ax,
            x + 0.04,
            3.8,
            width - 0.08,
            0.8,
            label,
            color=DELTA if on else PLAIN,
            size=8,
            c="white" if on else "#777",
        )
        _arrow(ax, (x + width / 2, 1.4), (x + width / 2, 2.2))
        _arrow(ax, (x + width / 2, 3.2), (x + width / 2, 3.8))
    ax.text(8.0, 2.7, "hook_z\n[pos, head, d_head]", fontsize=8, va="center")
    ax.text(8.0, 4.2, "+ Δ at the last\nprompt token only", fontsize=8, va="center", color=DELTA)
    _box(ax, 2.0, 5.3, 5.8, 0.8, "W$_O$: Σ$_h$ (z$_h$ + Δ$_h$) W$_O^h$  → attention output")
    _arrow(ax, (4.9, 4.6), (4.9, 5.3))
    _arrow(ax, (2.0, 5.7), (0.8, 5.7))
    ax.text(1.0, 5.95, "+", fontsize=12)
    _box(ax, 2.0, 7.0, 5.8, 0.8, "MLP")
    _arrow(ax, (0.8, 6.9), (2.0, 7.4))
    _arrow(ax, (2.0, 7.4), (0.8, 7.9))
    _box(ax, 2.0, 8.7, 5.8, 0.9, "blocks L+1 … → unembed → next-token logits", color=PLAIN)
    ax.text(
        5.0,
        -0.25,
        "Group lasso λ₂ Σ$_h$‖Δ$_h$‖₂: most heads' Δ$_h$ are exactly 0 (grey).",
        ha="center",
        fontsize=8,
        color="#333",
    )


def positions_panel(ax, n_layers: int = 8, layer: int = 4) -> None:
    """Positions × layers: Δ at (L, last); only the last position at layers ≥ L changes (causal attention)."""
    last = len(TOKENS) - 1
    for l in range(n_layers):
        for p in range(len(TOKENS)):
            color = PLAIN
            if p == last and l >= layer:
                color = CHANGED
            ax.add_patch(Rectangle((p, l), 0.92, 0.92, fc=color, ec="white"))
    ax.add_patch(Rectangle((last, layer), 0.92, 0.92, fc=DELTA, ec="white"))
    ax.text(last + 0.46, layer + 0.46, "+Δ", ha="center", va="center", color="white", fontsize=9, weight="bold")
    ax.set_xlim(-0.2, len(TOKENS) + 0.1)
    ax.set_ylim(-0.2, n_layers + 1.2)
    ax.set_xticks([p + 0.46 for p in range(len(TOKENS))], [repr(t)[1:-1] if t != "\\n" else "\\n" for t in TOKENS])
    ax.set_yticks(
        [l + 0.46 for l in range(n_layers)],
        [f"L{'+' if l > layer else ''}{l - layer}" if l != layer else "L" for l in range(n_layers)],
    )
    ax.tick_params(length=0, labelsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.text(last + 0.46, n_layers + 0.35, "logits", ha="center", fontsize=8, color=DELTA)
    _arrow(ax, (last + 0.46, n_layers - 0.05), (last + 0.46, n_layers + 0.2), color=DELTA)
    ax.set_title("Which positions it touches", fontsize=11)
    ax.set_xlabel("prompt tokens  ('Q: hot\\nA:' → target ' cold')", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.legend(
        handles=[
            Rectangle((0, 0), 1, 1, fc=DELTA),
            Rectangle((0, 0), 1, 1, fc=CHANGED),
            Rectangle((0, 0), 1, 1, fc=PLAIN),
        ],
        labels=["Δ added (hook_z, layer L)", "changed downstream", "exactly as before"],
        loc="upper left",
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.0, -0.13),
        ncol=3,
    )


def draw(path: Path) -> Path:
    """Write the two-panel figure to ``path`` (SVG, deterministic)."""
    plt.rcParams["svg.hashsalt"] = "lens_laai"
    plt.rcParams["svg.fonttype"] = "none"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1.35, 1]})
    block_panel(left)
    positions_panel(right)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return path


def _on_builder_inited(app: Any) -> None:
    draw(Path(app.srcdir) / "_generated" / "method_figure.svg")


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", _on_builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    print(draw(Path(__file__).parents[1] / "_generated" / "method_figure.svg"))
