"""Checkpoints keyed by global names (layer, expert, whole shape, shard offsets) so a checkpoint saved
under one layout loads under any other; atomic saves; Hugging Face adapters.
"""
