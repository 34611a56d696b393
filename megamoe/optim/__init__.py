"""Optimizers: the distributed (ZeRO-1) optimizer over sharded fp32 main params, mixed precision with loss
scaling, gradient clipping with a layout-independent global norm, and learning-rate / weight-decay schedules.
"""
