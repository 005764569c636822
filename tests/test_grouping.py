import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from prepack_actor.core.grouping import group_by_length
from prepack_actor.job.rows import make_groups


def test_example_from_docstring():
    assert group_by_length([5, 900, 7, 880], max_group_tokens=1000, max_group_prompts=64) == [[1], [3, 2, 0]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=80), st.integers(1, 600), st.integers(1, 10))
def test_groups_partition_rows_under_budgets(lengths, budget, max_rows):
    groups = group_by_length(lengths, budget, max_rows)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # nothing lost or doubled
    for g in groups:
        assert 1 <= len(g) <= max_rows
        assert len(g) == 1 or sum(lengths[i] for i in g) <= budget  # only a lone row may exceed
    # Sorted longest first: groups hold neighbours in length (no interleaving).
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat, reverse=True)


def test_pack_groups_isolates_error_rows():
    rows = [{"id": str(i), "error": None if i % 3 else "bad", "num_input_tokens": 0 if i % 3 == 0 else 10 * i}
            for i in range(10)]
    packed = make_groups(rows, max_group_tokens=100, max_group_prompts=3)
    groups = [pickle.loads(b) for b in packed["rows"]]
    assert sorted(r["id"] for g in groups for r in g) == sorted(r["id"] for r in rows)
    assert all(len({r["error"] is None for r in g}) == 1 for g in groups)
    assert packed["num_rows"] == [len(g) for g in groups]
    assert all(t <= 100 or n == 1 for t, n in zip(packed["num_tokens"], packed["num_rows"]))
