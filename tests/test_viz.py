"""viz: the pictures show the pack and the mask they are given (drawn headless, Agg)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from prepack_actor.core.masks import packed_causal  # noqa: E402
from prepack_actor.core.packing import pack  # noqa: E402
from prepack_actor.bench.viz import PAD_COLOR, draw_bars, draw_mask, draw_pack, mask_image, prompt_color  # noqa: E402

PROMPTS = [[1] * 7, [2] * 3, [3] * 4, [4] * 2]  # FFD at width 7: [p0], [p2, p1], [p3]


def test_mask_image_colours_exactly_the_allowed_cells():
    packed = pack(PROMPTS)
    for row in range(packed.num_rows):
        img = mask_image(packed, row)
        allowed = packed_causal(packed.segment_ids[row:row + 1], packed.position_ids[row:row + 1])[0, 0].numpy()
        assert img.shape == (packed.width, packed.width, 3)
        assert np.all(img[~allowed] == 1.0)
        for q in range(packed.width):
            seg = int(packed.segment_ids[row, q])
            want = PAD_COLOR if seg < 0 else prompt_color(seg)
            assert np.allclose(img[q, allowed[q]], want)


def test_draw_pack_draws_each_prompt_at_its_row_and_offset():
    packed = pack(PROMPTS)
    ax = draw_pack(packed, labels=["a", "b", "c", "d"])
    blocks = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch() is None]
    got = sorted((round(p.get_y() + 0.4), p.get_x(), p.get_width()) for p in blocks)
    want = sorted((int(packed.row[i]), int(packed.offset[i]), int(packed.length[i])) for i in range(len(PROMPTS)))
    assert got == want
    assert sum(p.get_hatch() == "//" for p in ax.patches) == packed.num_rows  # pad background per row
    assert {t.get_text().split("\n")[0] for t in ax.texts} <= {"a", "b", "c", "d"}
    assert draw_mask(packed, row=1).images


def test_draw_bars_labels_each_value():
    ax = draw_bars({"full batching": 0.5, "prepacking": 0.25}, fmt="{:.2f}")
    assert [p.get_height() for p in ax.patches] == [0.5, 0.25]
    assert [t.get_text() for t in ax.texts] == ["0.50", "0.25"]
