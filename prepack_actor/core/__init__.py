"""The prepacking mechanism: tensors in, tensors out (no files, no Ray, no text).

    groups = group_by_length(lengths, max_group_tokens, max_group_prompts)   grouping.py
    batch = pack(prompts, pack_capacity, pad_id, branches, stream=varlen)    packing.py
    enable_varlen(model) -> attention.NAME: cu_seqlens, no mask              attention.py, forward.py, cpu_prefill.cpp
    with fused_elementwise(model): C++ RMSNorm and RoPE on CPU               elementwise.py, cpu_elementwise.cpp
    mask = masks.for_model(model, batch)  (dense path: reference, fallback)  masks.py
    logits, cache = last_token_logits(model, batch, varlen)                  forward.py
    blocks.add(cache, batch, reserve)  (blocks = BlockCache(num_layers))     block_cache.py
    logits = block_step(model, blocks, tokens, positions)  (decoding())     decode.py, block_attention.py, cpu_decode.cpp
    codes = finisher.check(tokens)  (EOS, stop ids, min/max tokens)          finish.py
    fallback: kv_cache.unpack(cache, batch, room) -> decode(model, ...)      kv_cache.py, decode.py, sampling.py
    params = SamplingParams(temperature=0.7, n=2, logprobs=3)                params.py (no torch)
"""
