"""Pictures for notebooks (matplotlib): a packed batch, its attention mask, a bar chart.

    draw_pack(packed)                    # which prompt fills which part of which row; pad slots grey
    draw_mask(packed, row=0)  # the block-diagonal causal mask of one row, as an image
    draw_bars({"full batching": 0.12, "prepacking": 0.05}, ylabel="prefill time (s)")

Each takes an optional `ax` and returns the Axes it drew on. Prompt i has the same colour
in the pack and in the mask. Needs matplotlib (the `plots` extra); no Ray, no model.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from matplotlib.patches import Patch, Rectangle

from ..core.masks import packed_causal
from ..core.packing import PackedBatch

PAD_COLOR = (0.85, 0.85, 0.85)


def prompt_color(i: int) -> tuple[float, float, float]:
    """Colour of prompt i (cycles through matplotlib's tab20)."""
    return plt.get_cmap("tab20")(i % 20)[:3]


def _axes(ax, size: tuple[float, float]):
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def draw_pack(packed: PackedBatch, labels: list[str] | None = None, ax=None):
    """Rows of the pack as horizontal bars: one coloured block per prompt, grey pad slots.

    labels: one short name per prompt (default "p0", "p1", ...); shown with the token count
    inside the block when it is wide enough.
    """
    num_prompts = len(packed.length)
    labels = labels or [f"p{i}" for i in range(num_prompts)]
    assert len(labels) == num_prompts, f"{len(labels)} labels for {num_prompts} prompts"
    ax = _axes(ax, (10, 0.6 * packed.num_rows + 1.2))
    for r in range(packed.num_rows):  # the whole row as pad; prompts are drawn over it
        ax.add_patch(Rectangle((0, r - 0.4), packed.width, 0.8, facecolor=PAD_COLOR, hatch="//", lw=0))
    for i in range(num_prompts):
        r, start, n = int(packed.row[i]), int(packed.offset[i]), int(packed.length[i])
        ax.add_patch(Rectangle((start, r - 0.4), n, 0.8, facecolor=prompt_color(i), edgecolor="white", lw=1.5))
        if n >= 0.04 * packed.width:
            ax.text(start + n / 2, r, f"{labels[i]}\n{n}", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, packed.width)
    ax.set_ylim(packed.num_rows - 0.5, -0.5)
    ax.set_yticks(range(packed.num_rows), [f"row {r}" for r in range(packed.num_rows)])
    ax.set_xlabel("token slot")
    ax.set_title(f"{num_prompts} prompts packed into {packed.num_rows} rows of {packed.width} slots "
                 f"({packed.efficiency:.0%} real tokens)")
    ax.legend(handles=[Patch(facecolor=PAD_COLOR, hatch="//", label="pad")], loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=8)
    return ax


def mask_image(packed: PackedBatch, row: int = 0) -> np.ndarray:
    """[W, W, 3] RGB image of row `row`'s mask: prompt colour where query may attend key,
    grey for pad-to-pad, white where masked."""
    seg = packed.segment_ids[row : row + 1]  # [1, W]
    allowed = packed_causal(seg, packed.position_ids[row : row + 1], packed.branch_ids[row : row + 1])[0, 0].numpy()
    owner = seg[0].numpy()  # [W] prompt per query slot, -1 pad
    colors = np.array([PAD_COLOR if s < 0 else prompt_color(int(s)) for s in owner])  # [W, 3]
    return np.where(allowed[:, :, None], colors[:, None, :], 1.0)


def draw_mask(packed: PackedBatch, row: int = 0, ax=None):
    """The block-diagonal causal mask of one packed row (query down, key across)."""
    ax = _axes(ax, (5, 5))
    ax.imshow(mask_image(packed, row), interpolation="nearest")
    ax.set_xlabel("key slot")
    ax.set_ylabel("query slot")
    ax.set_title(f"row {row}: who may attend to whom")
    return ax


def draw_bars(values: dict[str, float], ylabel: str = "", title: str = "", fmt: str = "{:.3f}", ax=None):
    """A labelled bar per entry (e.g. median prefill seconds per method)."""
    ax = _axes(ax, (5, 3.5))
    names, heights = list(values), [float(v) for v in values.values()]
    bars = ax.bar(names, heights, color=[prompt_color(2 * i) for i in range(len(names))])
    ax.bar_label(bars, labels=[fmt.format(h) for h in heights])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, max(heights) * 1.2 if heights and max(heights) > 0 else 1)
    return ax
