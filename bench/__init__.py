"""packtune.bench: side-by-side benchmarks, one module per subject (`packtune bench SUBJECT`)."""
