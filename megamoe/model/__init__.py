"""GPT model: embedding, transformer blocks (attention with GQA and RoPE, dense MLP or MoE), final norm and output layer.

Layers are built from per-layer specs so the MLP slot can hold an MoE layer and a pipeline stage can hold any
contiguous run of layers. Every parameter is initialised from (seed, global name, global slice), never from the rank.
"""
