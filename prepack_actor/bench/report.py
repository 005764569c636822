"""Records -> results.json, PNG plots and the markdown table printed at the end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .measure import summarize  # noqa: E402

PREFILL_KEYS = ("prefill_s", "ttft_s", "pack_s", "mask_s", "split_s", "overhead_share", "peak_memory_bytes")


def prefill_records(dataset: str, batch_size: int, stats: dict[str, dict], rounds: dict[str, list[dict]],
                    best: tuple[float, int]) -> list[dict]:
    """One record per method: medians (+min/max) over repeats, speedups vs full batching."""
    records = []
    for method, rs in rounds.items():
        rec = {"dataset": dataset, "batch_size": batch_size, "method": method, **stats[method]}
        for key in PREFILL_KEYS:
            s = summarize([r[key] for r in rs])
            rec[key] = s["median"]
            rec[f"{key}_min"], rec[f"{key}_max"], rec[f"{key}_values"] = s["min"], s["max"], s["values"]
        rec["rows_per_batch"] = rs[0]["rows"]
        rec["memory_source"] = rs[0]["memory_source"]
        if method == "prepacking_best":
            rec["capacity_multiple"], rec["min_width"] = best
        records.append(rec)
    base = next((r for r in records if r["method"] == "full_batching"), None)
    for rec in records:
        if base is not None:
            rec["speedup_vs_full"] = base["prefill_s"] / rec["prefill_s"]
            rec["fraction_of_ideal"] = rec["speedup_vs_full"] / rec["ideal_speedup"]
            rec["memory_vs_full"] = rec["peak_memory_bytes"] / max(1, base["peak_memory_bytes"])
    return records


def generate_records(dataset: str, batch_size: int, new_tokens: int, rounds: dict[str, list[dict]]) -> list[dict]:
    records = []
    for method, rs in rounds.items():
        rec = {"dataset": dataset, "batch_size": batch_size, "method": method, "new_tokens": new_tokens,
               "output_tokens": rs[0]["output_tokens"]}
        for key in ("total_s", "ttft_s", "output_tokens_per_s", "requests_per_s", "peak_memory_bytes"):
            s = summarize([r[key] for r in rs])
            rec[key] = s["median"]
            rec[f"{key}_min"], rec[f"{key}_max"] = s["min"], s["max"]
        records.append(rec)
    base = next((r for r in records if r["method"] == "full_batching_generate"), None)
    for rec in records:
        if base is not None:
            rec["tokens_per_s_vs_full"] = rec["output_tokens_per_s"] / base["output_tokens_per_s"]
    return records


def write_json(path: Path, payload: dict) -> None:
    def clean(x):  # NaN is not JSON
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    path.write_text(json.dumps(clean(payload), indent=1))


def plot(records: list[dict], key: str, ylabel: str, path: Path, scale: float = 1.0) -> None:
    """One panel per dataset: `key` vs batch size, a line per method."""
    datasets = sorted({r["dataset"] for r in records})
    if not datasets:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = [r for r in records if r["dataset"] == ds and key in r]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["batch_size"], r[key] * scale) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if key == "speedup_vs_full":
            pts = sorted({(r["batch_size"], r["ideal_speedup"]) for r in rows})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="ideal (padded/real)")
        ax.set_title(ds)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r["batch_size"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_generation(records: list[dict], path: Path) -> None:
    """Output tokens/s per generation method, one bar group per (dataset, batch)."""
    if not records:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['method']}\n{r['dataset']} b{r['batch_size']}" for r in records]
    ax.bar(range(len(records)), [r["output_tokens_per_s"] for r in records],
           yerr=[[r["output_tokens_per_s"] - r["output_tokens_per_s_min"] for r in records],
                 [r["output_tokens_per_s_max"] - r["output_tokens_per_s"] for r in records]], capsize=4)
    ax.set_xticks(range(len(records)), labels, fontsize=7)
    ax.set_ylabel(f"output tokens/s (+{records[0]['new_tokens']} tokens per prompt)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(prefill: list[dict], generation: list[dict], largest: list[dict], notes: list[str]) -> str:
    lines = ["| dataset | batch | method | prefill s (min-max) | speedup | ideal | % of ideal | rows | "
             "max abs dev | peak MiB | overhead % |", "|" + " --- |" * 11]
    for r in prefill:
        lines.append(
            f"| {r['dataset']} | {r['batch_size']} | {r['method']} | {r['prefill_s']:.3f} "
            f"({r['prefill_s_min']:.3f}-{r['prefill_s_max']:.3f}) | {r.get('speedup_vs_full', float('nan')):.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {100 * r.get('fraction_of_ideal', float('nan')):.0f}% | "
            f"{r['rows_per_batch']:.1f} | {r['max_abs_deviation']:.0f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{100 * r['overhead_share']:.1f} |")
    if generation:
        lines += ["", "| dataset | batch | method | new tokens | total s (min-max) | output tok/s | req/s | "
                  "vs full | TTFT s | peak MiB |", "|" + " --- |" * 10]
        for r in generation:
            ttft = "-" if r["ttft_s"] is None or math.isnan(r["ttft_s"]) else f"{r['ttft_s']:.2f}"
            lines.append(
                f"| {r['dataset']} | {r['batch_size']} | {r['method']} | {r['new_tokens']} | {r['total_s']:.2f} "
                f"({r['total_s_min']:.2f}-{r['total_s_max']:.2f}) | {r['output_tokens_per_s']:.1f} | "
                f"{r['requests_per_s']:.2f} | {r.get('tokens_per_s_vs_full', float('nan')):.2f}x | {ttft} | "
                f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    if largest:
        lines += ["", "| dataset | method | largest batch | memory cap GB |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['dataset']} | {r['method']} | {r['largest_batch']}{'+' if r['hit_limit'] else ''} | "
                  f"{r['memory_gb']} |" for r in largest]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])
