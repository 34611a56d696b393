"""Data: tokenizers, Megatron-compatible indexed datasets (.bin/.idx), GPT sample construction, blending,
and the data-parallel pretraining sampler.
"""
