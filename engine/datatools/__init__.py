"""Instruction-data tools: templatize labeled datasets, expand seed tasks with an LLM (Self-Instruct),
and evaluate instruction following (`packtune data templatize`, `packtune data self-instruct`,
`packtune eval`). Local models answer through packtune's batched KV-cache generation
(`local_generation.generate_answers`)."""
