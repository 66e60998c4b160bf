"""`packtune demo`: a generated instruction mix, a tokenizer trained on it, and a tiny Llama
trained from scratch with the real engine, scored by held-out exact match."""
