"""Test bodies timed by bench/gloo_pool_overhead.py (module-level, so pool workers can import them)."""

import torch
import torch.distributed as dist


def nothing():
    return None


def one_all_reduce():
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()
