"""Command-line tools: tokenizer training, sample data generation, and other helpers."""
