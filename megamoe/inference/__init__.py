"""Evaluation (perplexity) and generation from checkpoints, under any layout."""
