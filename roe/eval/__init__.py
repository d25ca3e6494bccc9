"""Evaluation: held-out perplexity, built-in tasks, and the lm-eval model."""
