"""The inference server: one base model per engine, many LoRA adapters, requests batched across adapters.

server.py    the HTTP app the API calls (`create_inference_app`)
engine.py    the scheduler thread: admission by KV cache tokens, chunked prefill, continuous batching
kv_cache.py  the preallocated KV cache pool, written in place, and the Cache view each forward pass uses
batch.py     the inputs of one forward pass over some rows: tokens, positions, 4D mask, cache view
lora.py      adapters read from safetensors and applied per row of a batch, grouped by adapter
adapters.py  the LRU cache of loaded adapters, fetched through the API on first use
sampling.py  greedy and seeded top-p sampling of all rows at once
transfer.py  host-to-device copies that do not wait for the device
text.py      incremental detokenisation and stop strings
settings.py  PHITUNE_INFERENCE_* settings
"""
