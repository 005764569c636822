"""The prepacking mechanism: tensors in, tensors out (no files, no Ray, no text).

    groups = group_by_length(lengths, max_group_tokens, max_group_prompts)   grouping.py
    batch = pack(prompts, pack_capacity, pad_id, branches)                   packing.py
    mask = masks.for_model(model, batch)                                     masks.py
    logits, cache = last_token_logits(model, batch)                          forward.py
    cache, attention_mask = kv_cache.unpack(cache, batch, room)              kv_cache.py
    decoded = decode(model, cache, attention_mask, ..., sampler, ...)        decode.py, sampling.py
    params = SamplingParams(temperature=0.7, n=2, logprobs=3)                params.py (no torch)
"""
