"""The inference server: one base model per engine, many LoRA adapters, requests batched across adapters.

server.py    the HTTP app the API calls (`create_inference_app`)
engine.py    the scheduler thread: continuous batching over a left-padded KV cache
batch.py     the tensors of the running batch: cache, attention mask, positions
lora.py      adapters read from safetensors and applied per row of a batch
adapters.py  the LRU cache of loaded adapters, fetched through the API on first use
archive.py   safe extraction of adapter archives
sampling.py  greedy and seeded top-p sampling
text.py      incremental detokenisation and stop strings
settings.py  PHITUNE_INFERENCE_* settings
"""
