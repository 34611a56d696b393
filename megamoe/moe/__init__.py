"""Mixture-of-Experts layer: router (top-k, sinkhorn, expert-choice), token dispatcher (all-gather, all-to-all),
grouped-GEMM experts, aux/z losses injected through autograd, and per-layer load metrics.

Routing is a property of the micro-batch, not of the rank: capacity, drops and balancing statistics are computed
over a declared routing group.
"""
