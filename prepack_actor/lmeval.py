"""An lm-evaluation-harness (0.4.13) backend: `--model prepack`, with lm-eval's own numbers.

    prepack-lm-eval --model prepack --model_args pretrained=DIR --tasks mmlu --include_path MY_TASKS
    python -m prepack_actor.lmeval --model prepack --model_args pretrained=DIR,max_group_tokens=8192 ...

    from prepack_actor.lmeval import PrepackLM         # in Python: lm_eval.simple_evaluate(model=PrepackLM(...))

lm-eval 0.4.13 has no plugin entry point, so `prepack-lm-eval` (and `python -m
prepack_actor.lmeval`) is lm-eval's own command line with this model registered first;
every other option, task and model (`--model hf` included) is unchanged.

Requests are tokenized as `HFLM` does (inputs.encode_pairs: BOS by the tokenizer's default,
trailing context whitespace moved; the prefix token for an empty context), truncated on the
left as `HFLM._loglikelihood_tokens` does, and scored by loglik.py: one unit per distinct
context, packed without padding. `loglikelihood_rolling` uses lm-eval's windows
(loglik.rolling_requests); `generate_until` runs on the Engine (greedy unless do_sample).

model_args: pretrained (dir, HF id, tiny:ARCH, or a loaded model with tokenizer=), dtype
(auto: bf16/fp16 on GPU, fp32 on CPU | float32 | bfloat16 | float16), device (auto: cuda when
present; --device sets it), max_length (default: lm-eval's rule), mode
(shared | simple), max_group_tokens, max_group_prompts, varlen, max_gen_toks, add_bos_token,
prefix_token_id, trust_remote_code. batch_size is accepted and ignored (groups are by tokens).
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import lm_eval.models  # noqa: F401  - lm-eval's own models first: registering ours into an empty
#                                       registry would stop lm-eval from loading them (--model hf)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text, \
    resolve_max_length

from .core.params import SamplingParams
from .engine import Engine, EngineConfig
from .inputs import encode_ids, encode_pairs, prefix_token
from .loglik import Request
from .models import load_model, resolve_model_path
from .scoring import ScoreConfig, Scorer

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither config nor tokenizer says


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("prepack")
class PrepackLM(TemplateLM):
    def __init__(self, pretrained: Any = "tiny:llama", tokenizer: Any = None, dtype: str = "auto",
                 device: str | None = None, max_length: int | None = None, mode: str = "shared",
                 max_group_tokens: int = 8192, max_group_prompts: int = 1024, varlen: Any = True,
                 compile: Any = False, max_gen_toks: int = 256, add_bos_token: Any = None,
                 prefix_token_id: int | None = None, trust_remote_code: Any = False,
                 cache_dir: str = "artifacts/models", batch_size: Any = None, max_batch_size: Any = None,
                 **unused: Any):
        super().__init__()
        if unused:
            log.warning("prepack: model_args not used: %s", sorted(unused))
        if isinstance(pretrained, str):
            path = resolve_model_path(pretrained, cache_dir)
            model, tok = load_model(path, dtype, device or "auto", trust_remote_code=_flag(trust_remote_code))
        else:  # a loaded model object, as HFLM accepts
            if tokenizer is None:
                raise ValueError("prepack: pretrained=<model object> needs tokenizer=<tokenizer>")
            model, tok = pretrained, tokenizer
        self.tokenizer = tok
        self.scorer = Scorer(model, tok, ScoreConfig(mode=mode, max_group_tokens=int(max_group_tokens),
                                                     max_group_prompts=int(max_group_prompts),
                                                     varlen=_flag(varlen), compile=_flag(compile)))
        self._engine: Engine | None = None
        self._max_length = int(max_length) if max_length else resolve_max_length(
            model.config, tok, default=DEFAULT_MAX_LENGTH)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else _flag(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)

    # --- what TemplateLM asks -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """HFLM's: a custom id, else BOS, else EOS (conditions an empty context or a document's first window)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        return self.tok_encode_batch([string], add_special_tokens, left_truncate_len)[0]

    def tok_encode_batch(self, strings: list[str], add_special_tokens: bool | None = None,
                         left_truncate_len: int | None = None) -> list[list[int]]:
        """HFLM.tok_encode for many strings in one tokenizer call."""
        if not strings:
            return []
        if add_special_tokens is not None:
            ids = [list(x) for x in self.tokenizer(strings, add_special_tokens=add_special_tokens)["input_ids"]]
        else:
            ids = encode_ids(self.tokenizer, strings, True if self.add_bos_token is None else self.add_bos_token)
        return [x[-left_truncate_len:] for x in ids] if left_truncate_len else ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM.loglikelihood with the tokenization batched (same tokens)."""
        args = [req.args for req in requests]
        full = [i for i, (ctx, _) in enumerate(args) if ctx]
        enc: dict[int, tuple[list[int], list[int]]] = dict(zip(full, encode_pairs(self.tokenizer, [args[i] for i in full])))
        empty = [i for i, (ctx, _) in enumerate(args) if not ctx]
        for i, cont in zip(empty, self.tok_encode_batch([args[i][1] for i in empty], add_special_tokens=False)):
            enc[i] = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
        return self._loglikelihood_tokens([(args[i], *enc[i]) for i in range(len(args))])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context_enc, continuation_enc) -> (logprob, is_greedy)."""
        reqs = [Request(*self._truncate(ctx, cont)) for _, ctx, cont in requests]
        out = [(r.logprob, r.is_greedy) for r in self.scorer.loglikelihood(reqs)]
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """HFLM's left truncation: the model's input is (ctx + cont)[-(max_length + 1):][:-1]."""
        assert 0 < len(cont) <= self.max_length, f"continuation of {len(cont)} tokens, max_length {self.max_length}"
        whole = (ctx + cont)[-(self.max_length + 1):]
        return whole[:len(whole) - len(cont)], cont

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over lm-eval's disjoint windows of max_length tokens."""
        docs = self.tok_encode_batch([req.args[0] for req in requests])
        out = [r.logprob for r in self.scorer.rolling_loglikelihood(docs, self.prefix_token_id, self.max_length)]
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled with do_sample) generation on the Engine, cut at `until` as HFLM does."""
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for idx in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            assert self.max_length - max_gen_toks > 0, f"max_gen_toks {max_gen_toks} >= max_length {self.max_length}"
            contexts = self.tok_encode_batch([requests[i].args[0] for i in idx],
                                             left_truncate_len=self.max_length - max_gen_toks)
            sampled = kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0
            params = SamplingParams(max_new_tokens=max_gen_toks, temperature=float(kwargs["temperature"]) if sampled
                                    else 0.0, top_p=float(kwargs.get("top_p") or 1.0) if sampled else 1.0,
                                    top_k=int(kwargs.get("top_k") or 0) if sampled else 0, stop=until)
            for i, res in zip(idx, self.engine.generate(contexts, params)):
                text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's (`--apply_chat_template`): the tokenizer's template; without the system turn if it refuses one."""
        import jinja2
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            s = self.scorer
            self._engine = Engine(s.model, s.tokenizer, EngineConfig(varlen=s.config.varlen, compile=s.config.compile))
        return self._engine


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `--model prepack` registered (console script `prepack-lm-eval`)."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
