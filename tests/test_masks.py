"""Masks: the vectorised predicate equals a dense loop reference; no NaN rows."""
import torch

from prepack_actor.core.masks import additive, packed_causal
from prepack_actor.core.packing import pack


def dense_reference(segment_ids, window=None):
    r, w = segment_ids.shape
    m = torch.zeros(r, 1, w, w, dtype=torch.bool)
    for b in range(r):
        for q in range(w):
            for k in range(w):
                same = segment_ids[b, q] == segment_ids[b, k]
                near = window is None or q - k < window
                m[b, 0, q, k] = bool(same and k <= q and near)
    return m


def test_block_causal_equals_dense_reference():
    p = pack([[1] * n for n in (5, 3, 2, 7, 1, 4)], capacity=8)
    for window in (None, 2):
        got = packed_causal(p.segment_ids, p.position_ids, None, window)
        assert torch.equal(got, dense_reference(p.segment_ids, window))
        assert got.any(-1).all(), "every query row, pad slots included, sees some key"


def test_prompts_never_see_each_other():
    p = pack([[1, 2], [3, 4, 5]], capacity=5)
    m = packed_causal(p.segment_ids, p.position_ids)[0, 0]
    seg = p.segment_ids[0]
    for q in range(5):
        for k in range(5):
            if seg[q] != seg[k]:
                assert not m[q, k]


def test_additive_mask_values():
    m = torch.tensor([[True, False]])
    a = additive(m, torch.float32)
    assert a[0, 0] == 0 and a[0, 1] == torch.finfo(torch.float32).min


def test_chunked_mask_equals_dense_reference():
    """Llama 4 chunked layers: q sees k only inside the same chunk of positions, per prompt."""
    from prepack_actor.core.masks import dense_reference
    p = pack([[1] * n for n in (13, 3, 9, 17)], capacity=20)
    got = packed_causal(p.segment_ids, p.position_ids, None, None, chunk=4)
    for r in range(p.num_rows):
        ref = dense_reference(p.segment_ids[r].tolist(), p.position_ids[r].tolist(), chunk=4)
        assert torch.equal(got[r, 0], ref)
    assert got.any(-1).all()
    seg, pos = p.segment_ids[0], p.position_ids[0]
    for q in range(p.width):  # position 4 starts a new chunk: it sees itself only
        if pos[q] == 4 and seg[q] >= 0:
            assert got[0, 0, q].sum() == 1
