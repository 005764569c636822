"""Benchmark prepacking against full and length-ordered batching (Zhao et al., 2024).

    python jobs/benchmark.py datasets=[../shared/data/alpaca.jsonl,../shared/data/mmlu.jsonl] \
        batch_sizes=[32,64] output_dir=results/benchmark

Reads top to bottom: config, load data, build model, run prefill methods (interleaved
repeats), run generation methods, largest batch (GPU), write JSON and plots, print the
table. See conf/benchmark.yaml for every knob.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from prepack_actor.bench import report  # noqa: E402
from prepack_actor.bench.config import BenchmarkConfig  # noqa: E402
from prepack_actor.bench.generate import generate_runner  # noqa: E402
from prepack_actor.bench.largest import largest_batch  # noqa: E402
from prepack_actor.bench.measure import interleaved, prepare_cpu_allocator, use_clock  # noqa: E402
from prepack_actor.bench.methods import VARLEN_METHODS, capacity_rule, prefill_runner  # noqa: E402
from prepack_actor.bench.workload import dataset_name, make_workload, predictors, read_prompts  # noqa: E402
from prepack_actor.job.config_file import config_or_exit, to_dict  # noqa: E402
from prepack_actor.models import load_model  # noqa: E402
from prepack_actor.tiny import build_tiny_model  # noqa: E402

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "conf" / "benchmark.yaml"


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str]) -> dict:
    # 1. Config: schema <- conf/benchmark.yaml <- key=value, all checked before any work.
    cfg = config_or_exit(BenchmarkConfig, argv, DEFAULT_YAML)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 2. Data: every prompt file's texts.
    texts = {}
    for path in dict.fromkeys(cfg.datasets + cfg.generate_datasets):
        try:
            texts[path] = read_prompts(path)
        except (FileNotFoundError, KeyError) as e:
            print(f"error: dataset {path}: {e}", file=sys.stderr)
            sys.exit(1)

    # 3. Model: the given one, or a random-weight Llama whose BPE is trained on the datasets.
    model_path = cfg.model
    if not model_path:
        model_path = cfg.model_cache_dir
        if not (Path(model_path) / "config.json").is_file():
            log(f"building the default model in {model_path}")
            build_tiny_model("llama", model_path, size="small", texts=[t for ts in texts.values() for t in ts])
    model, tokenizer = load_model(model_path, dtype=cfg.dtype, device=cfg.device)
    device, pad_id = model.device, tokenizer.pad_token_id
    if device.type == "cpu":
        prepare_cpu_allocator()
        use_clock(cfg.clock)
    context = getattr(model.config, "max_position_embeddings", 2048)
    token_ids, notes = {}, []
    for path, ts in texts.items():
        ids = [x for x in tokenizer(ts)["input_ids"] if 0 < len(x) <= context - cfg.new_tokens]
        if len(ids) < len(ts):
            notes.append(f"{dataset_name(path)}: {len(ts) - len(ids)} prompts longer than the context dropped")
        token_ids[path] = ids
    env = {"device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
           "clock": "cuda events" if device.type == "cuda" else cfg.clock,
           "torch": torch.__version__, "model": model_path,
           "parameters": sum(p.numel() for p in model.parameters())}
    log(f"model {model_path}: {env['parameters'] / 1e6:.1f}M params on {device} ({env['dtype']}), "
        f"{env['cpu_threads']} threads")

    def save(**parts) -> dict:
        payload = {"config": to_dict(cfg), "environment": env, "wall_s": time.perf_counter() - t_start,
                   "prefill": [], "generation": [], "largest_batch": [], "notes": notes, **parts}
        report.write_json(out_dir / "results.json", payload)
        return payload

    # 4. Prefill: every method on the same sampled prompts, rounds interleaved.
    prefill_records = []
    for path in cfg.datasets if cfg.methods else []:
        for bs in cfg.batch_sizes:
            wl = make_workload(dataset_name(path), token_ids[path], bs, cfg.num_batches, cfg.seed)
            lengths = {m: [[len(p) for p in b] for b in wl.batches(m)] for m in cfg.methods}
            rules = {m: capacity_rule(m, cfg.best_capacity_multiple, cfg.best_min_width) for m in cfg.methods}
            stats = {m: predictors(lengths[m], *(rules[m] or (1.0, 0))) for m in cfg.methods}
            ideal = predictors([[len(p) for p in b] for b in wl.batches("full_batching")])["ideal_speedup"]
            for m in cfg.methods:  # one reference for all: padded/real tokens of the random batches
                stats[m]["method_ideal_speedup"] = stats[m]["ideal_speedup"]
                stats[m]["ideal_speedup"] = ideal
            log(f"{wl.dataset} batch {bs}: {len(wl.prompts)} prompts, ideal speedup {ideal:.2f}x")
            runners = {m: prefill_runner(model, wl.batches(m), pad_id, rules[m], m in VARLEN_METHODS)
                       for m in cfg.methods}
            rounds = interleaved(runners, cfg.repeats, cfg.warmup, log)
            prefill_records += report.prefill_records(wl.dataset, bs, stats, rounds,
                                                      (cfg.best_capacity_multiple, cfg.best_min_width))
            save(prefill=prefill_records)  # partial results survive an interrupted run

    # 5. Generation: prefill + new_tokens per prompt, one batch, methods interleaved.
    generation_records = []
    if cfg.generate_methods and cfg.generate_repeats:
        for path in cfg.generate_datasets:
            wl = make_workload(dataset_name(path), token_ids[path], cfg.generate_batch_size, 1, cfg.seed)
            log(f"generation {wl.dataset} batch {cfg.generate_batch_size} + {cfg.new_tokens} new tokens")
            runners = {m: generate_runner(m, model, tokenizer, wl.prompts, cfg.new_tokens, cfg.cb_max_batch_tokens)
                       for m in cfg.generate_methods}
            rounds = interleaved(runners, cfg.generate_repeats, cfg.warmup, log)
            generation_records += report.generate_records(wl.dataset, cfg.generate_batch_size, cfg.new_tokens, rounds)
            save(prefill=prefill_records, generation=generation_records)

    # 6. Largest batch under one memory cap: GPU only.
    largest = []
    if cfg.largest_batch and device.type == "cuda":
        for path in cfg.datasets:
            for m in cfg.methods:
                if m != "length_ordered":  # a single batch sorted by length is full batching
                    r = largest_batch(model, token_ids[path], m, pad_id, cfg.largest_batch_memory_gb,
                                      cfg.largest_batch_limit, cfg.best_capacity_multiple, cfg.best_min_width,
                                      cfg.seed)
                    largest.append({"dataset": dataset_name(path), **r})
                    log(f"largest batch {dataset_name(path)} {m}: {r['largest_batch']}")
    elif cfg.largest_batch:
        notes.append("largest batch that fits: skipped (needs a CUDA device; on CPU there is no fixed memory to fill)")
    if prefill_records:
        notes.append(f"peak memory source: {prefill_records[0]['memory_source']}")

    # 7. Write results.json and plots; print the table.
    payload = save(prefill=prefill_records, generation=generation_records, largest_batch=largest)
    report.plot(prefill_records, "speedup_vs_full", "prefill speedup vs full batching", out_dir / "speedup.png")
    report.plot(prefill_records, "peak_memory_bytes", "peak prefill memory (MiB)", out_dir / "peak_memory.png",
                scale=1 / 2**20)
    report.plot_generation(generation_records, out_dir / "generation.png")
    log("\n" + report.markdown(prefill_records, generation_records, largest, notes))
    log(f"\nwrote {out_dir / 'results.json'}, and the PNG plots ({payload['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
