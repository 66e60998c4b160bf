"""The Llama-family model: config.json parsing, the decoder, Hugging Face checkpoint I/O, generation."""
