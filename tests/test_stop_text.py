"""Stop strings on incrementally detokenized text (outputs.StopText): the same stops and
offsets as decoding every sequence whole at each step, at a cost linear in its length."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prepack_actor.core.sampling import SamplingParams
from prepack_actor.outputs import StopChecker, StopText
from prepack_actor.tiny import build_tokenizer, sample_texts


def byte_level():
    """The project's tokenizer: byte-level BPE (GPT-2 style), BOS/EOS specials."""
    return build_tokenizer(sample_texts(), 600, add_bos=True)


def metaspace():
    """A Llama/sentencepiece-style tokenizer: '▁' for spaces, byte fallback for unknown
    characters (<0xC3><0xA9> is 'é'), the first leading space stripped on decode."""
    chars = list("▁abcdeéhilnorstu.,")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("e", "s")]
    for c in chars + ["".join(m) for m in merges]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def wordpiece():
    """A decoder whose cleanup rewrites earlier text (" ." -> "." once the "." comes):
    checked on the whole decode each time."""
    words = ["[UNK]", "[CLS]", "hello", "world", "a", ",", ".", "?", "'", "s", "##s", "##ing", "n't", "do"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[CLS]")


def reference(tok, tokens: list[int], params: SamplingParams):
    """The rule as specified: decode everything so far after each token; the first step at
    which a stop string (ending after the first min_tokens tokens' text) appears."""
    for n in range(params.min_tokens + 1, len(tokens) + 1):
        text = tok.decode(tokens[:n], skip_special_tokens=True)
        after = len(tok.decode(tokens[:params.min_tokens], skip_special_tokens=True)) if params.min_tokens else 0
        hits = [(i, s) for s in params.stop if (i := text.find(s, max(0, after - len(s) + 1))) >= 0]
        if hits:
            return n, *min(hits)
    return None


def incremental(tok, tokens: list[int], params: SamplingParams):
    stops, text = StopChecker(tok, set()), StopText()
    for n in range(1, len(tokens) + 1):
        stopped, at, reason = stops.check(tokens[:n], params, text)
        if stopped:
            return n, at, reason
    return None


@pytest.mark.parametrize("make", [byte_level, metaspace, wordpiece])
def test_incremental_stops_equal_decoding_everything(make):
    tok = make()
    rng = random.Random(0)
    vocab = len(tok)
    checked = stopped = 0
    for trial in range(300):
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]  # specials and lone bytes included
        full = tok.decode(tokens, skip_special_tokens=True)
        stop = []
        for _ in range(rng.randint(1, 3)):  # pieces of the text (some cross token and character boundaries)
            if full and rng.random() < 0.8:
                i = rng.randrange(len(full))
                stop.append(full[i:i + rng.randint(1, 4)])
            else:
                stop.append("zq")
        params = SamplingParams(max_new_tokens=64, stop=stop, min_tokens=rng.choice([0, 0, 2, 5]))
        want = reference(tok, tokens, params)
        assert incremental(tok, tokens, params) == want, (trial, tokens, stop)
        checked, stopped = checked + 1, stopped + (want is not None)
    assert stopped > 100  # most trials really stop somewhere
    assert StopChecker(tok, set()).incremental == (make is not wordpiece)


def test_stop_check_cost_is_linear_in_length():
    tok = byte_level()
    decoded = [0]
    plain = tok.decode

    def counting(ids, **kw):
        decoded[0] += len(ids)
        return plain(ids, **kw)

    tok.decode = counting
    tokens = tok(" ".join(sample_texts()), add_special_tokens=False)["input_ids"][:800]  # real text: valid UTF-8
    assert len(tokens) == 800
    params = SamplingParams(max_new_tokens=800, stop=["\x00never"])
    assert incremental(tok, tokens, params) is None
    # whole-text decoding would decode 800 * 801 / 2 = 320,400 tokens; incremental a few per step
    assert decoded[0] < 10 * len(tokens)
