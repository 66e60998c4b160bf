"""packtune's models: the family registry (families/, one file per family), the shared decoder of
the Llama-like families (llama.py) with its mixture-of-experts blocks (moe.py) and BLOOM's own
model (bloom.py) on one causal-LM base (causal_lm.py), config.json <-> ModelArgs (config.py,
rope_config.py), Hugging Face checkpoint I/O (hf_io.py; MXFP4 experts: mxfp4.py), loading for
training and inference (loading.py), generation with a KV cache (generate.py, kv_cache.py)."""
