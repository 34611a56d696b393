"""Tensor- and sequence-parallel building blocks: column/row-parallel linears, the vocab-parallel
embedding and cross entropy, and the RNG tracker that keeps dropout identical where activations are replicated.

All communication goes through megamoe.parallel.comm and megamoe.parallel.regions.
"""
