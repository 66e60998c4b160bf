"""Instruction-data tools: templatize labeled datasets, expand seed tasks with an LLM (Self-Instruct),
and evaluate instruction following (`packtune data templatize`, `packtune data self-instruct`,
`packtune eval`)."""
