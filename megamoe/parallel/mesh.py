"""ParallelMesh: the process groups of a ParallelConfig, created once, and this rank's place in them.

Build one per run, inside an initialized torch.distributed world, and pass it (or the AxisGroups a module needs) to
whatever needs it; no layer reads a global.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.group import AxisGroup
from megamoe.parallel.layout import GROUP_KINDS, RankLayout
from megamoe.parallel.ledger import CommLedger

# Megatron-LM's --distributed-timeout-minutes default.
DEFAULT_TIMEOUT = timedelta(minutes=10)
# Kinds that get a gloo twin when the main backend is not gloo: data-parallel metadata travels on the CPU.
GLOO_TWIN_KINDS = ("dp", "dp_cp", "edp")


def default_device(backend: str) -> torch.device:
    """cuda:<current> for NCCL, cpu otherwise."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ParallelMesh:
    """Every process group of a layout, as AxisGroups, plus this rank's coordinates.

    mesh["tp"], mesh["ep"], ... give this rank's group of that kind (GROUP_KINDS lists them). mesh["embd"] and
    mesh["pos_embd"] are None on ranks that hold no embedding. Each distinct set of ranks gets one torch process
    group however many kinds share it; groups of one rank get none.

    A mesh of one rank may be built without torch.distributed (single-process tools and tests), and with
    standalone=True also inside a multi-rank world (e.g. a shape-only model that lists a checkpoint's tensors).

    Args:
        config: validated sizes; its world_size must equal the launched world size.
        backend: backend of the sub-groups; default: the world's backend.
        device: where this rank's tensors live; default: cuda:<current> with NCCL, else cpu.
        timeout: how long any collective on these groups may take before failing with the group's name.
        ledger: the CommLedger the groups record into; default: a new one (mesh.ledger).
    """

    def __init__(self, config: ParallelConfig, *, backend: str | None = None, device: torch.device | None = None,
                 timeout: timedelta = DEFAULT_TIMEOUT, ledger: CommLedger | None = None,
                 standalone: bool = False) -> None:
        if standalone and config.world_size != 1:
            raise ValueError("a standalone ParallelMesh has one rank")
        initialized = dist.is_initialized() and not standalone
        if not initialized and config.world_size != 1:
            raise RuntimeError("ParallelMesh needs an initialized torch.distributed world: call "
                               "megamoe.parallel.world.init_distributed() first (under torchrun or srun)")
        if initialized and dist.get_world_size() != config.world_size:
            raise ValueError(f"the parallel config was made for {config.world_size} ranks but "
                             f"{dist.get_world_size()} were launched; build ParallelConfig with "
                             f"world_size=torch.distributed.get_world_size()")
        self.config = config
        self.layout = RankLayout.from_config(config)
        # A one-rank mesh needs no torch.distributed at all: every group is this rank alone.
        self.rank = dist.get_rank() if initialized else 0
        self.backend = backend or (dist.get_backend() if initialized else "gloo")
        self.device = device if device is not None else default_device(self.backend)
        self.timeout = timeout
        self.ledger = ledger if ledger is not None else CommLedger()
        self.coordinates = self.layout.coordinates(self.rank)
        self._groups = self._create_groups()
        world_pg = dist.group.WORLD if config.world_size > 1 else None
        self.world = AxisGroup("world", tuple(range(config.world_size)), self.rank, world_pg,
                               world_pg if self.backend == "gloo" else None, self.ledger, timeout)

    def _create_groups(self) -> dict[str, AxisGroup | None]:
        # torch requires every rank to call new_group for every group, in the same order: iterate over the layout
        # (identical on all ranks), never over this rank's groups only.
        made: dict[tuple[int, ...], dist.ProcessGroup] = {}
        twins: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for kind in GROUP_KINDS:
            for ranks in map(tuple, self.layout.groups[kind]):
                if len(ranks) > 1 and ranks not in made:
                    made[ranks] = dist.new_group(list(ranks), backend=self.backend, timeout=self.timeout)
        for kind in GLOO_TWIN_KINDS:
            for ranks in map(tuple, self.layout.groups[kind]):
                if len(ranks) > 1 and ranks not in twins:
                    twins[ranks] = (made[ranks] if self.backend == "gloo"
                                    else dist.new_group(list(ranks), backend="gloo", timeout=self.timeout))
        groups: dict[str, AxisGroup | None] = {}
        for kind in GROUP_KINDS:
            ranks = self.layout.group_of(kind, self.rank)
            if ranks is None:
                groups[kind] = None
                continue
            key = tuple(ranks)
            pg = made.get(key)
            cpu_pg = twins.get(key, pg if self.backend == "gloo" else None)
            groups[kind] = AxisGroup(kind, key, ranks.index(self.rank), pg, cpu_pg, self.ledger, self.timeout)
        return groups

    def __getitem__(self, kind: str) -> AxisGroup | None:
        if kind not in self._groups:
            raise KeyError(f"unknown group kind {kind!r}; kinds: {', '.join(GROUP_KINDS)}")
        return self._groups[kind]

    @property
    def pp_stage(self) -> int:
        return self.coordinates["pp"]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.config.pp - 1

    def __repr__(self) -> str:
        coords = " ".join(f"{k}={v}" for k, v in self.coordinates.items())
        return f"ParallelMesh(rank={self.rank}, {coords}, backend={self.backend}, device={self.device})"
