"""Scoring library: packed log-likelihoods equal each (prompt, choice) run alone through HF."""
from __future__ import annotations

import json
import math
from importlib import resources

import pytest
import torch

from prepack_actor.core.masks import dense_reference, packed_causal
from prepack_actor.core.packing import pack
from prepack_actor.inputs import ItemError, check_item, encode_item
from prepack_actor.loglik import Request, _layout, plan
from prepack_actor.models import load_model
from prepack_actor.scoring import ScoreConfig, Scorer, accuracy, decide, score

ITEMS = [
    {"prompt": "The capital of France is", "choices": [" Paris", " London", " a city in Europe", " 42"],
     "answer": 0},
    {"prompt": "Question: 2 + 2 = ?\nAnswer: ", "choices": ["4", "5"], "answer": 0},  # trailing space moves
    {"prompt": "Below is an instruction.\n\n### Response:", "choices": [" Sure, here it is.", " No"]},
    {"prompt": "x", "choices": [" y"], "answer": 0},  # one-token prompt (BOS-less archs), one choice
    {"prompt": "The following are multiple choice questions (with answers) about anatomy.\n\n"
               "Which bone is longest?\nA. femur\nB. tibia\nC. ulna\nD. radius\nAnswer:",
     "choices": [" A", " B", " C", " D"], "answer": 0},
    {"prompt": "abc", "choices": ["def", "d", "defdefdef"], "answer": 2},  # boundary merges possible
]


def sample_scoring(n: int) -> list[dict]:
    path = resources.files("prepack_actor") / "data" / "sample_scoring.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


@torch.inference_mode()
def reference(model, tokenizer, item: dict) -> tuple[list[float], list[int], list[bool]]:
    """Each pair alone through HF: lm-eval's tokens (context + continuation), full forward, log_softmax."""
    enc = encode_item(tokenizer, check_item(item))
    sums, counts, greedy = [], [], []
    c = len(enc.context)
    for cont in enc.continuations:
        ids = torch.tensor([enc.context + cont])
        logits = model(input_ids=ids, use_cache=False).logits[0].float()  # [L, V]
        lp = torch.log_softmax(logits, -1)
        targets = ids[0, c:]
        sums.append(float(lp[c - 1:-1].gather(-1, targets[:, None]).sum()))
        counts.append(len(targets))
        greedy.append(bool((logits[c - 1:-1].argmax(-1) == targets).all()))
    return sums, counts, greedy


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scores_equal_each_pair_alone(tiny_model_dir, arch, attn):
    model, tok = load_model(tiny_model_dir(arch), dtype="float32", device="cpu", attn_implementation=attn)
    items = ITEMS + sample_scoring(3)
    refs = [reference(model, tok, it) for it in items]
    for mode, varlen in (("simple", True), ("shared", True), ("shared", False)):
        # a small group budget forces several groups and many items per packed row
        results = score(model, tok, items, mode=mode, config=ScoreConfig(max_group_tokens=600, varlen=varlen))
        for it, res, (sums, counts, greedy) in zip(items, results, refs):
            assert res.choice_num_tokens == counts
            assert res.choice_is_greedy == greedy
            assert max(abs(a - b) for a, b in zip(res.choice_logprobs, sums)) < 1e-4, (arch, attn, mode, it)
            assert res.pred == max(range(len(sums)), key=sums.__getitem__)
        assert any(r.pack_units > r.pack_rows for r in results), "no row held more than one unit"
        if mode == "shared":
            assert sum(r.shared for r in results) >= 5  # most multi-choice items shared their prompt


def test_modes_agree_and_shared_lays_out_fewer_tokens(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    items = sample_scoring(20)
    simple, shared = score(model, tok, items, mode="simple"), score(model, tok, items, mode="shared")
    for a, b in zip(simple, shared):
        assert max(abs(x - y) for x, y in zip(a.choice_logprobs, b.choice_logprobs)) < 1e-4
        assert (a.pred, a.pred_norm, a.choice_is_greedy) == (b.pred, b.pred_norm, b.choice_is_greedy)
        assert b.shared and not a.shared
    # 4 one-token choices: shared costs one prompt + 4 tokens, simple four prompts + 4 tokens
    assert sum(r.num_tokens for r in shared) < 0.3 * sum(r.num_tokens for r in simple)


def test_tree_mask_matches_dense_reference():
    units = [([1, 2, 3], [[4, 5], [6], [7, 8, 9]]), ([10], [[11]]), ([12, 13], [[14]])]
    batch = pack([u[0] for u in units], 12, 0, [u[1] for u in units])
    mask = packed_causal(batch.segment_ids, batch.position_ids, batch.branch_ids)
    for r in range(batch.num_rows):
        ref = dense_reference(batch.segment_ids[r].tolist(), batch.position_ids[r].tolist(),
                              batch.branch_ids[r].tolist())
        assert torch.equal(mask[r, 0], ref)
        assert mask[r, 0].any(-1).all()  # no all-masked query row (pads see each other)
    # the first unit: branch 2 ([6]) sits at position 3 and sees the prompt and itself only
    r, o = 0, int((batch.segment_ids[0] == 0).nonzero()[0])
    assert batch.position_ids[r, o:o + 9].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert mask[r, 0, o + 5, o:o + 9].tolist() == [True] * 3 + [False, False, True] + [False] * 3
    # loglik lays continuation c as branch c[:-1]: [4, 5, x] and [6, y] and [7, 8, 9, z] give these branches;
    # every first target is read at the prompt's last column, later ones on the branch
    p = plan([Request([1, 2, 3], c) for c in ([4, 5, 0], [6, 0], [7, 8, 9, 0], [5])])
    assert p.branches == [[[4, 5], [6], [7, 8, 9]]] and p.where == [(0, 0), (0, 1), (0, 2), (0, -1)]
    b, ctx_last, start = _layout(p, [0], False, None, 0)
    assert ctx_last[0] == 2 and [start[(0, j)] for j in range(3)] == [3, 5, 6]
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_harness_tokenization_moves_trailing_space(tiny_model_dir):
    _, tok = load_model(tiny_model_dir("gpt2"), dtype="float32", device="cpu")
    enc = encode_item(tok, check_item({"prompt": "Answer: ", "choices": ["yes", "no"]}))
    assert enc.context == tok("Answer:")["input_ids"]
    whole = tok("Answer: yes")["input_ids"]
    assert enc.continuations[0] == whole[len(enc.context):]
    assert tok.decode(enc.continuations[0]) == " yes"


def test_boundary_merge_scores_as_lm_eval(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("gpt2"), dtype="float32", device="cpu")
    # find a prompt whose last token merges with one choice but not the other
    for prompt, merge in (("Th", "e"), ("wh", "ich"), ("qu", "estion"), ("an", "d")):
        if tok(prompt + merge)["input_ids"][:len(tok(prompt)["input_ids"])] != tok(prompt)["input_ids"]:
            break
    else:
        pytest.skip("no boundary merge in this tokenizer")
    item = {"prompt": prompt, "choices": [merge + " is a good test", " zzz"], "answer": 1}
    res = score(model, tok, [item], mode="shared")[0]
    assert res.shared  # lm-eval's context is the prompt alone: always shared
    sums, _, _ = reference(model, tok, item)
    assert max(abs(a - b) for a, b in zip(res.choice_logprobs, sums)) < 1e-4


@pytest.mark.parametrize("raw, reason", [
    ({"prompt": "q", "choices": []}, "'choices' is empty"),
    ({"prompt": "q"}, "'choices' must be a list"),
    ({"prompt": "q", "choices": " A"}, "'choices' must be a list"),
    ({"prompt": "q", "choices": [" A", 3]}, "choice 1 must be a string"),
    ({"prompt": "q", "choices": [" A", ""]}, "choice 1 is an empty string"),
    ({"prompt": "q", "choices": [" A"], "answer": 1}, "out of range"),
    ({"prompt": "q", "choices": [" A"], "answer": -1}, "out of range"),
    ({"prompt": "q", "choices": [" A"], "answer": "0"}, "must be an integer"),
    ({"prompt": "q", "choices": [" A"], "answer": True}, "must be an integer"),
    ({"prompt": "", "choices": [" A"]}, "empty prompt"),
    ({"prompt": "  \n", "choices": [" A"]}, "empty prompt"),
    ({"prompt": None, "choices": [" A"]}, "'prompt' must be a string"),
])
def test_bad_items_give_specific_errors(tiny_model_dir, raw, reason):
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    with pytest.raises(ItemError, match=reason) as e:
        score(model, tok, [ITEMS[0], raw])
    assert e.value.index == 1
    results = score(model, tok, [ITEMS[0], raw, ITEMS[1]], errors="return")
    assert [r.error is None for r in results] == [True, False, True]
    assert reason.strip("'") in results[1].error and results[1].choice_logprobs == []


def test_decide_and_accuracy_from_hand_made_scores():
    choices = [" A", " BBBB", " C"]
    d = decide([-3.0, -4.0, -3.5], [1, 4, 1], choices, answer=1)
    assert (d["pred"], d["pred_norm"], d["correct"], d["correct_norm"]) == (0, 1, False, True)
    d = decide([-3.0, -4.0, -3.5], [1, 4, 1], choices, answer=None, length_norm="tokens")
    assert (d["pred"], d["pred_norm"], d["correct"]) == (0, 1, None)


def test_rigged_model_scores_100_percent(tiny_model_dir):
    """A model whose head strongly prefers each item's answer letter gets every item right."""
    model, tok = load_model(tiny_model_dir("llama"), dtype="float32", device="cpu")
    items = sample_scoring(12)
    letter = {j: tok(" " + "ABCD"[j], add_special_tokens=False)["input_ids"][-1] for j in range(4)}
    state = {"answer": 0}

    # rig: the head's output at every kept column strongly favours the current item's
    # answer letter; items are scored one at a time so the answer of each forward is known.
    def rig(module, args, out):
        out = out.clone()
        out[..., letter[state["answer"]]] += 1e4
        return out

    handle = model.get_output_embeddings().register_forward_hook(rig)
    try:
        results = []
        for it in items:
            state["answer"] = it["answer"]
            results += Scorer(model, tok, ScoreConfig(mode="shared")).score([it])
    finally:
        handle.remove()
    acc = accuracy(results)
    assert acc["accuracy"] == 1.0 and acc["accuracy_norm"] == 1.0 and acc["judged"] == 12
    assert all(r.choice_is_greedy[it["answer"]] for r, it in zip(results, items))


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        ScoreConfig(mode="tree")
    with pytest.raises(ValueError, match="max_group_tokens"):
        ScoreConfig(max_group_tokens=0)
    assert math.isclose(ScoreConfig().max_group_tokens, 8192)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pair_tokens_equal_whole_string_encoding(tiny_model_dir, arch):
    """encode_pairs' shortcut (only the tail after a pre-token boundary is re-encoded) gives the
    tokens of encoding context + choice whole, lm-eval's rule, on awkward strings too."""
    from prepack_actor.inputs import _local_bpe, encode_ids, encode_pairs
    _, tok = load_model(tiny_model_dir(arch), dtype="float32", device="cpu")
    assert _local_bpe(tok)  # the shortcut is what runs here
    contexts = [it["prompt"] for it in sample_scoring(40)] + [
        "Answer: ", "a  b  c ", "x y\n\nz w", "numbers 123 456 and  ", "émigré café naïve déjà", "tab\tsep word",
        "it's a dog's life", "A (b) c", "one.two three", "end with space  \n", "<|bos|> starts with bos word"]
    conts = [" A", "A", " it's", "\n\nnext", "  double", " 42", "x", " é", " word more words"]
    pairs = [(c, k) for c in contexts for k in conts]
    got = encode_pairs(tok, pairs)
    for (ctx, cont), (c_ids, k_ids) in zip(pairs, got):
        s = ctx.rstrip()
        whole = encode_ids(tok, [s + ctx[len(s):] + cont])[0]
        assert c_ids == encode_ids(tok, [s])[0] and k_ids == whole[len(c_ids):], (ctx, cont)
