"""Sharded checkpoints keyed by global tensor identity (torch.distributed.checkpoint), resharding across layouts."""
