"""Small random-weight checkpoints of real architectures, with a locally trained tokenizer.

Nothing can be downloaded here, so tests, the default job and the benchmark use models
built by this module and saved with `save_pretrained`; they load through exactly the
`from_pretrained` path a real checkpoint takes. CLI:

    python -m prepack_actor.tiny --arch llama --size small --out artifacts/llama-small
"""
from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
# hidden, layers, heads, kv heads, mlp width. "small" is ~70M parameters with vocab 8192.
SIZES = {"tiny": (64, 2, 4, 2, 128), "small": (768, 8, 12, 4, 2048)}
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]
# ChatML, the template Qwen2 uses; rendered by tokenizer.apply_chat_template.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sample_texts() -> list[str]:
    """The bundled sample prompts (a slice of Alpaca and MMLU)."""
    path = resources.files("prepack_actor") / "data" / "sample_prompts.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def build_tokenizer(texts: list[str], vocab_size: int, add_bos: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` in milliseconds; realistic token counts for them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS + ["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if add_bos:  # Llama-style: every encoded prompt starts with BOS
        bos = tok.token_to_id("<|bos|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE, model_max_length=2048)


def build_tiny_model(arch: str, out: str | Path, size: str = "tiny", vocab_size: int | None = None,
                     texts: list[str] | None = None, seed: int = 0, max_positions: int = 2048,
                     **config_overrides) -> Path:
    """Build, save and return the checkpoint directory of a random-weight `arch` model.

    config_overrides go to the architecture's config (e.g. sliding_window=8 for Mistral).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    hidden, layers, heads, kv_heads, mlp = SIZES[size]
    vocab_size = vocab_size or (1024 if size == "tiny" else 8192)
    tokenizer = build_tokenizer(texts or sample_texts(), vocab_size, add_bos=arch in ("llama", "mistral"))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    if arch == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=heads,
                                      n_inner=mlp, n_positions=max_positions, **ids, **config_overrides)
    else:
        config = AutoConfig.for_model(
            arch, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=mlp,
            max_position_embeddings=max_positions, tie_word_embeddings=False, **ids,
            **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.update(**{k: v for k, v in ids.items() if k != "vocab_size"})
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    ap.add_argument("--corpus", nargs="*", default=[], help="JSONL files whose 'prompt' texts train the BPE")
    args = ap.parse_args()
    texts = [json.loads(line)["prompt"] for f in args.corpus for line in open(f) if line.strip()]
    print(build_tiny_model(args.arch, args.out, args.size, args.vocab_size, texts or None))


if __name__ == "__main__":
    main()
