"""Data pipeline: corpus assembly from offline package sources and tokenizer training."""
