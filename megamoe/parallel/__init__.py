"""Parallel layout and communication.

ParallelConfig (sizes, validated) -> RankLayout (pure rank enumeration, Megatron-Core's groups) -> ParallelMesh
(the created process groups and this rank's coordinates, passed explicitly to whatever needs them). comm.py is the
only module that calls torch.distributed collectives; it records calls and bytes in a CommLedger. regions.py holds
the autograd-aware tensor/sequence-parallel region functions built on comm.py.
"""

from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout import GROUP_KINDS, RankLayout

__all__ = ["GROUP_KINDS", "ParallelConfig", "RankLayout"]
