"""Data-parallel gradient handling: contiguous param-and-grad buffers, buckets and their reduction
over dp x cp (dense) or expert-dp (experts), and finalize-grads (tied embeddings, sequence-parallel norms).
"""
