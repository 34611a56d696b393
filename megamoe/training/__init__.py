"""The training loop: batches in, optimizer steps out, with logging, evaluation, exit conditions and
checkpointing.
"""
