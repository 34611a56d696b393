"""megamoe: pretrain Mixture-of-Experts GPT models with Megatron-style 4D parallelism.

The same code runs on one CPU (gloo) and on thousands of GPUs (NCCL); see design/ARCHITECTURE.md for the layers
of the system and the invariants every layout must keep.
"""

__version__ = "0.1.0"
