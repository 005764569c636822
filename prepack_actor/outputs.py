"""What a generate call returns (vLLM's RequestOutput / CompletionOutput in prepack's terms),
the stop rules that end a sequence, and the one function every path (block decode, the
left-padded reference, unpacked HF generate) builds its results with."""
from __future__ import annotations

from dataclasses import dataclass, field

from .capability import PACKED
from .core.decode import Decoded
from .core.sampling import Logprob, SamplingParams


@dataclass
class Completion:
    """One of a prompt's n completions (vLLM's CompletionOutput)."""
    index: int  # 0 .. n-1; sequence i is seeded by sampling.sequence_seeds(seed, n)[i]
    text: str  # generated text, special tokens skipped, without the stop string or stop token
    token_ids: list[int]  # generated token ids (the EOS or stop token id that ended it included)
    finish_reason: str  # "stop" (EOS, stop token id or stop string) | "length" (max_new_tokens)
    stop_reason: str | int | None  # the stop string or stop token id that ended it; None otherwise (EOS too)
    logprobs: list[dict[int, Logprob]] | None  # per token: chosen token first, then the top k (when asked)


@dataclass
class GenerationResult:
    text: str  # outputs[0].text: generated text, special tokens skipped, cut before a stop string
    token_ids: list[int]  # outputs[0].token_ids (EOS included when it ended the prompt)
    finish_reason: str  # outputs[0].finish_reason: "stop" (EOS, stop id or string) | "length"
    num_input_tokens: int
    num_generated_tokens: int  # over all n completions
    prefill_s: float  # forward pass over the packed prompts this prompt was prefilled with
    ttft_s: float  # hand-over (the generate call's start) to this prompt's first token
    decode_s: float  # first token to this prompt's last token
    overhead_s: float  # packing + cache fill + first sampling of its prefill
    pack_prompts: int  # prompts in the group (rows before packing)
    pack_rows: int  # packed rows after packing
    pack_efficiency: float  # real tokens / packed slots, in (0, 1]
    stop_reason: str | int | None = None  # outputs[0].stop_reason
    logprobs: list[dict[int, Logprob]] | None = None  # outputs[0].logprobs
    outputs: list[Completion] = field(default_factory=list)  # all n completions (SamplingParams.n)
    engine_path: str = "packed"  # "packed" | "packed_bucketed" | "unpacked" (capability.py)
    queue_s: float = 0.0  # hand-over to the start of this prompt's prefill (waiting for a slot)


@dataclass
class Admission:
    """One prefill of prompts (a packed pass, or one HF generate call): the timings its prompts report."""
    start: float  # perf_counter() when packing began
    prefill_s: float = 0.0
    first: float = 0.0  # perf_counter() at the first tokens
    overhead_s: float = 0.0  # packing + cache fill + first sampling
    pack_prompts: int = 0
    pack_rows: int = 0
    pack_efficiency: float = 1.0


@dataclass
class StopText:
    """One sequence's generated text for its stop strings, kept across checks and extended
    with vLLM's prefix/read offsets: a check decodes the tokens since the last one with a few
    before them for context, not the whole sequence (O(tokens), not O(tokens^2), per sequence)."""
    text: str = ""  # the text of tokens[:read], equal to decoding them whole
    prefix: int = 0  # the decode window starts here: tokens[prefix:read] give the new tokens context
    read: int = 0  # tokens whose text is in `text`
    searched: int = 0  # chars of `text` already searched for every stop string, with no hit
    after: int | None = None  # chars of the first min_tokens tokens' text (computed once)


def append_only(tokenizer) -> bool:
    """Whether decoding one more token only appends text, so StopText may extend it. Not so
    where a cleanup pass rewrites text already decoded (" ." becomes "." once the "." comes:
    WordPiece's decoder, transformers' clean_up_tokenization_spaces), nor known for a
    tokenizer without a `tokenizers` backend: those decode the whole text each check."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    return backend.decoder is None or b'"cleanup":true' not in backend.decoder.__getstate__()


class StopChecker:
    """EOS ids, stop token ids and stop strings, none before min_tokens (vLLM's rules);
    decodes text only for sequences that have stop strings."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.incremental = append_only(tokenizer)

    def check(self, tokens: list[int], params: SamplingParams,
              text: StopText | None = None) -> tuple[bool, int | None, str | int | None]:
        """-> (stopped, char offset of the stop string or None, stop reason), after tokens[-1]
        joined. text: the sequence's StopText, kept by the caller across its checks (needed
        when params.stop is set)."""
        if len(tokens) <= params.min_tokens:
            return False, None, None
        if not params.ignore_eos and tokens[-1] in self.eos_ids:
            return True, None, None
        if tokens[-1] in params.stop_token_ids:
            return True, None, tokens[-1]
        if params.stop:
            assert text is not None, "stop strings need the sequence's StopText"
            return self.scan(tokens, params, text)
        return False, None, None

    def scan(self, tokens: list[int], params: SamplingParams, t: StopText) -> tuple[bool, int | None, str | None]:
        """The first stop string in the text of `tokens` (ending after min_tokens' text), as
        decoding them whole finds it, searching only the text added since the last check (an
        earlier hit would have stopped the sequence then). Offsets are in the whole decode,
        which `completion` cuts."""
        if t.after is None:
            t.after = len(self._decode(tokens[:params.min_tokens])) if params.min_tokens else 0
        new, whole = "", None
        if self.incremental:
            before = self._decode(tokens[t.prefix:t.read])
            new = self._decode(tokens[t.prefix:])[len(before):]
            if "\ufffd" in before + new:  # invalid UTF-8 bytes can change how earlier text reads
                whole = self._decode(tokens)
            if new and not new.endswith("\ufffd"):  # the last character is complete: commit
                t.text = whole if whole is not None else t.text + new
                t.prefix, t.read, new = t.read, len(tokens), ""
        else:
            whole = self._decode(tokens)
        if whole is None:  # the new text, and as far back as the longest stop string reaches
            lo = max(0, t.searched - max(map(len, params.stop)) + 1)
            text, since = t.text[lo:] + new, t.searched - lo
        else:  # all of it: any part may read differently now
            lo, text, since = 0, whole, 0
        t.searched = len(t.text)
        if any(text.find(s, max(0, t.after - lo - len(s) + 1, since - len(s) + 1)) >= 0 for s in params.stop):
            full = whole if whole is not None else self._decode(tokens)
            hits = [(i, s) for s in params.stop if (i := full.find(s, max(0, t.after - len(s) + 1))) >= 0]
            if hits:
                return True, *min(hits)
        return False, None, None

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def completion(tokenizer, index: int, d: Decoded) -> Completion:
    """A decoded sequence -> its Completion: text without the stop token (vLLM) or stop string."""
    tokens = d.token_ids
    if d.finish_reason == "stop" and d.stop_at is None:  # ended by EOS or a stop token id
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if d.stop_at is not None:
        text = text[: d.stop_at]
    return Completion(index, text, d.token_ids, d.finish_reason, d.stop_reason, d.logprobs)


def generation_result(tokenizer, num_input_tokens: int, decoded: list[Decoded], adm: Admission, start: float,
                      engine_path: str = PACKED) -> GenerationResult:
    """One prompt's result from its n decoded sequences (in sequence order) and the prefill
    that admitted it; start: the hand-over time (the generate call's start)."""
    outputs = [completion(tokenizer, i, d) for i, d in enumerate(decoded)]
    c, last = outputs[0], max(d.finished_at for d in decoded)
    return GenerationResult(
        text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason, num_input_tokens=num_input_tokens,
        num_generated_tokens=sum(len(o.token_ids) for o in outputs), prefill_s=adm.prefill_s,
        ttft_s=adm.first - start, decode_s=max(0.0, last - adm.first), overhead_s=adm.overhead_s,
        pack_prompts=adm.pack_prompts, pack_rows=adm.pack_rows, pack_efficiency=adm.pack_efficiency,
        stop_reason=c.stop_reason, logprobs=c.logprobs, outputs=outputs, queue_s=adm.start - start,
        engine_path=engine_path)
