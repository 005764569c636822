"""lm-eval parity: prepack's log-likelihoods, decisions, rolling and generation equal lm-eval's HFLM.

HFLM runs with logits_cache=False: its cache scores a request that shares ctx + cont[:-1]
with a longer one from the longer one's logits (a known lm-eval bug), which is not the oracle.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from prepack_actor.inputs import encode_ids  # noqa: E402
from prepack_actor.lmeval import PrepackLM  # noqa: E402
from prepack_actor.loglik import rolling_requests  # noqa: E402
from prepack_actor.models import load_model  # noqa: E402
from prepack_actor.scoring import ScoreConfig, Scorer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MMLU = [json.loads(line) for line in
        (resources.files("prepack_actor") / "data" / "sample_scoring.jsonl").read_text().splitlines() if line.strip()]
MULTI = [  # multi-token continuations: shared heads, one choice extending another, trailing space moved
    {"prompt": "The capital of France is", "choices": [" Paris", " Paris, France", " a city in Europe",
                                                        " a city in Asia", " 42"], "answer": 0},
    {"prompt": "Question: 2 + 2 = ?\nAnswer: ", "choices": ["4", "four", "5 or so"], "answer": 0},
    {"prompt": "Below is an instruction.\n\n### Response:", "choices": [" Sure, here it is.", " No"], "answer": 1},
    {"prompt": "The capital of France is", "choices": [" London", " Paris"], "answer": 1},  # same context again
    {"prompt": "abc", "choices": ["def", "d", "defdefdef"], "answer": 2},
]
DOCS = [" ".join(it["prompt"] for it in MMLU[:k]) for k in (1, 3, 6)]


def instances(items):
    return [Instance("loglikelihood", {}, (it["prompt"], c), 0) for it in items for c in it["choices"]]


def lm_eval_decisions(items, results):
    """acc / acc_norm as lm-eval 0.4.13's multiple_choice process_results (choices without the " " delimiter)."""
    out, k = [], 0
    for it in items:
        lls = np.array([r[0] for r in results[k:k + len(it["choices"])]])
        k += len(it["choices"])
        lengths = np.array([float(len(c[1:] if c.startswith(" ") else c)) for c in it["choices"]])
        out.append((int(np.argmax(lls)), int(np.argmax(lls / lengths))))
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_model_dir):
    """(HFLM on one copy of the model, the prepack objects on another) for llama (BOS) and gpt2 (none)."""
    path = tiny_model_dir(request.param)
    hf_model, hf_tok = load_model(path, dtype="float32", device="cpu")
    model, tok = load_model(path, dtype="float32", device="cpu")
    hf = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=8, logits_cache=False)
    hf.arch = request.param
    return hf, PrepackLM(pretrained=model, tokenizer=tok), model, tok


def test_logliks_and_decisions_equal_hflm(pair):
    hf, pp, model, tok = pair
    items = MMLU + MULTI
    expected = hf.loglikelihood(instances(items), disable_tqdm=True)
    got = pp.loglikelihood(instances(items))
    assert max(abs(a[0] - b[0]) for a, b in zip(expected, got)) < 1e-4
    assert [a[1] for a in expected] == [b[1] for b in got]
    decisions = lm_eval_decisions(items, expected)
    for mode in ("shared", "simple"):
        results = Scorer(model, tok, ScoreConfig(mode=mode, max_group_tokens=700)).score(items)
        flat = [(lp, g) for r in results for lp, g in zip(r.choice_logprobs, r.choice_is_greedy)]
        assert max(abs(a[0] - b[0]) for a, b in zip(expected, flat)) < 1e-4, mode
        assert [a[1] for a in expected] == [b[1] for b in flat], mode
        assert [(r.pred, r.pred_norm) for r in results] == decisions, mode
        assert [r.correct for r in results] == [p == it["answer"] for it, (p, _) in zip(items, decisions)]


def test_tokens_equal_hflm(pair):
    hf, pp, _, tok = pair
    strings = ["Hello world", "  spaced  ", (tok.bos_token or tok.eos_token) + "already prefixed", "x"]
    assert encode_ids(tok, strings) == [hf.tok_encode(s) for s in strings]
    assert [pp.tok_encode(s) for s in strings] == [hf.tok_encode(s) for s in strings]
    # HFLM adds special tokens by the tokenizer's default: BOS for Llama-style tokenizers, none for GPT-2's
    assert (encode_ids(tok, ["Hello"])[0][0] == tok.bos_token_id) == (hf.arch == "llama")
    pairs = [("Answer: ", "4"), ("", " empty context")]
    reqs = [Instance("loglikelihood", {}, p, 0) for p in pairs]
    assert max(abs(a[0] - b[0]) for a, b in zip(hf.loglikelihood(reqs, disable_tqdm=True),
                                                 pp.loglikelihood(reqs))) < 1e-4


@pytest.mark.parametrize("n, max_len", [(1, 8), (8, 8), (9, 8), (30, 8), (31, 7), (5, 1), (40, 16)])
def test_rolling_windows_are_lm_evals(n, max_len):
    tokens = list(range(100, 100 + n))
    expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, max_len, 1)]
    assert [(r.context, r.continuation) for r in rolling_requests(tokens, 1, max_len)] == expected


def test_rolling_loglikelihood_equals_hflm(pair):
    hf, pp, _, _ = pair
    reqs = [Instance("loglikelihood_rolling", {}, (d,), 0) for d in DOCS]
    hf._max_length, pp._max_length = 48, 48  # several windows per document
    try:
        expected = hf.loglikelihood_rolling(reqs, disable_tqdm=True)
        got = pp.loglikelihood_rolling(reqs)
    finally:
        hf._max_length, pp._max_length = None, 2048
    assert max(abs(a - b) for a, b in zip(expected, got)) < 1e-3  # sums of hundreds of tokens
    assert max(abs(a - b) / abs(a) for a, b in zip(expected, got)) < 1e-6


def test_generate_until_equals_hflm(pair, tiny_model_dir):
    hf, pp, _, _ = pair
    one = HFLM(pretrained=hf.model, tokenizer=hf.tokenizer, batch_size=1)  # unpadded: the per-prompt oracle
    reqs = [Instance("generate_until", {}, (it["prompt"], {"until": ["\n", "."], "max_gen_toks": 8,
                                                           "do_sample": False}), 0) for it in MMLU[:4] + MULTI[:2]]
    assert pp.generate_until(reqs) == one.generate_until(reqs, disable_tqdm=True)


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def cli_accuracy(tmp_path: Path, name: str, args: list[str]) -> dict:
    out = tmp_path / name
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), PYTHONPATH=str(REPO))
    proc = subprocess.run([*args, "--tasks", "tiny_mc", "--include_path", str(tmp_path / "tasks"),
                           "--device", "cpu", "--output_path", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_mc"]
    return {k: results[k] for k in ("acc,none", "acc_norm,none")}


@pytest.mark.slow
def test_lm_eval_cli_prepack_equals_hf(tiny_model_dir, tmp_path):
    """A user's local JSONL task: `python -m prepack_actor.lmeval --model prepack` == `lm_eval --model hf`."""
    data = tmp_path / "tiny_mc.jsonl"
    rows = [{"question": it["prompt"], "choices": [c.strip() for c in it["choices"]], "answer": it["answer"]}
            for it in MMLU[:24] + MULTI]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    model = tiny_model_dir("llama")
    lm_eval_bin = str(Path(sys.executable).parent / "lm_eval")
    hf = cli_accuracy(tmp_path, "hf", [lm_eval_bin, "--model", "hf", "--model_args",
                                       f"pretrained={model},dtype=float32,logits_cache=False", "--batch_size", "8"])
    pp = cli_accuracy(tmp_path, "prepack", [sys.executable, "-m", "prepack_actor.lmeval", "--model", "prepack",
                                            "--model_args", f"pretrained={model},dtype=float32"])
    assert pp == hf


def test_registering_prepack_keeps_lm_evals_models():
    """lm-eval loads its own models only into an empty registry: ours must not come first."""
    code = ("import prepack_actor.lmeval; from lm_eval.api.registry import get_model; "
            "print(get_model('hf').__name__, get_model('prepack').__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.split() == ["HFLM", "PrepackLM"], proc.stderr[-2000:]


def test_chat_template_equals_hflm(pair):
    hf, pp, _, tok = pair
    if not tok.chat_template:
        pytest.skip("no chat template")
    chat = [{"role": "user", "content": "2 + 2 = ?"}]
    assert pp.apply_chat_template(chat) == hf.apply_chat_template(chat)
