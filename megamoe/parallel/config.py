"""ParallelConfig: the parallel sizes of a run, their Megatron-LM flags, and their validation.

Validation is pure Python and runs on every rank before any collective, so an impossible layout fails the same
way everywhere instead of hanging in the first process-group creation.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# The tokens of a rank-order string. The leftmost token varies fastest across consecutive ranks.
ORDER_TOKENS = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"
# What Megatron-LM's --use-tp-pp-dp-mapping selects.
TP_PP_DP_ORDER = "tp-cp-ep-pp-dp"

# The flag that sets each field, for error messages.
FLAGS = {
    "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size",
    "vpp": "--virtual-pipeline-model-parallel-size",
    "cp": "--context-parallel-size",
    "ep": "--expert-model-parallel-size",
    "etp": "--expert-tensor-parallel-size",
    "sequence_parallel": "--sequence-parallel",
    "world_size": "the number of ranks (torchrun --nnodes x --nproc-per-node, or srun --ntasks)",
    "order": "--use-tp-pp-dp-mapping / --rank-order",
}


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of every parallel dimension of a run.

    Dense layers decompose the ranks as tp x cp x dp x pp; expert layers decompose the same ranks as
    etp x ep x edp x pp ("MoE parallel folding"). dp and edp are derived, never given.

    Attributes:
        world_size: number of ranks.
        tp: tensor-parallel size (dense layers).
        pp: pipeline-parallel size (stages).
        cp: context-parallel size.
        ep: expert-parallel size.
        etp: expert-tensor-parallel size; None means "same as tp", as in Megatron-LM.
        vpp: virtual pipeline chunks per stage (interleaved schedule); None when not interleaving.
        sequence_parallel: shard activations outside attention/MLP along the sequence across tp ranks.
        order: rank order, leftmost token fastest (Megatron-LM's default "tp-cp-ep-dp-pp").
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    sequence_parallel: bool = False
    order: str = DEFAULT_ORDER

    def __post_init__(self) -> None:
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        problems = self.problems()
        if problems:
            raise ValueError("invalid parallel layout:\n  - " + "\n  - ".join(problems))

    # Derived sizes ---------------------------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Data-parallel size of dense layers: world / (tp * cp * pp)."""
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        """Data-parallel size of expert layers: world / (etp * ep * pp)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def order_tokens(self) -> tuple[str, ...]:
        """The order as a tuple of all five tokens; tokens the string leaves out are appended (they have size 1)."""
        given = tuple(self.order.lower().split("-"))
        return given + tuple(t for t in ORDER_TOKENS if t not in given)

    def dense_sizes(self) -> dict[str, int]:
        """Axis sizes of the dense decomposition, keyed by order token (ep is 1 there)."""
        return {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp, "pp": self.pp}

    def expert_sizes(self) -> dict[str, int]:
        """Axis sizes of the expert decomposition, keyed by order token (tp means etp, dp means edp, cp is 1)."""
        return {"tp": self.etp, "cp": 1, "ep": self.ep, "dp": self.edp, "pp": self.pp}

    # Validation -------------------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason this layout is impossible, each naming the flags and the fix. Empty when valid."""
        out: list[str] = []
        for name in ("world_size", "tp", "pp", "cp", "ep", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{FLAGS[name]} must be an integer >= 1, got {value!r}")
        if self.vpp is not None and (not isinstance(self.vpp, int) or isinstance(self.vpp, bool) or self.vpp < 1):
            out.append(f"{FLAGS['vpp']} must be an integer >= 1 or unset, got {self.vpp!r}")
        if out:
            return out  # the checks below divide by these sizes

        model = self.tp * self.cp * self.pp
        if self.world_size % model:
            out.append(
                f"world size {self.world_size} is not divisible by tp*cp*pp = {self.tp}*{self.cp}*{self.pp} = {model}: "
                f"{FLAGS['tp']} x {FLAGS['cp']} x {FLAGS['pp']} must divide {FLAGS['world_size']}; "
                f"change the sizes or the number of ranks"
            )
        elif self.world_size % (self.etp * self.ep * self.pp):
            out.append(
                f"expert parallelism must fold into the dense layout: etp*ep = {self.etp}*{self.ep} = "
                f"{self.etp * self.ep} must divide tp*cp*dp = world/pp = {self.world_size // self.pp} "
                f"({FLAGS['etp']} x {FLAGS['ep']} vs the ranks of one pipeline stage); "
                f"pick sizes whose product divides {self.world_size // self.pp}"
            )
        if self.vpp is not None and self.pp == 1:
            out.append(
                f"{FLAGS['vpp']}={self.vpp} needs {FLAGS['pp']} > 1 (virtual stages interleave real ones); "
                f"drop {FLAGS['vpp']} or raise {FLAGS['pp']}"
            )
        if self.sequence_parallel and self.tp == 1:
            out.append(
                f"{FLAGS['sequence_parallel']} needs {FLAGS['tp']} > 1 (it shards activations across tp ranks); "
                f"drop {FLAGS['sequence_parallel']} or raise {FLAGS['tp']}"
            )
        out.extend(self._order_problems(layout_ok=not out))
        return out

    def _order_problems(self, layout_ok: bool) -> list[str]:
        tokens = self.order.lower().split("-")
        unknown = [t for t in tokens if t not in ORDER_TOKENS]
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        if unknown or repeated:
            what = f"unknown tokens {unknown}" if unknown else f"repeated tokens {repeated}"
            return [
                f"rank order {self.order!r} ({FLAGS['order']}) has {what}; use a '-'-joined permutation of "
                f"{'-'.join(ORDER_TOKENS)}, e.g. {DEFAULT_ORDER!r}"
            ]
        if not layout_ok:
            return []
        out = []
        for token in ORDER_TOKENS:
            if token not in tokens and (self.dense_sizes()[token] > 1 or self.expert_sizes()[token] > 1):
                out.append(
                    f"rank order {self.order!r} leaves out {token!r}, but that dimension has size > 1; "
                    f"name every dimension larger than 1 in the order"
                )
        if out or self.pp == 1:
            return out
        # Both decompositions must put the pipeline stages on the same ranks: the stride of pp (the product of the
        # sizes before it in the order) must agree. With pp last it always does.
        dense_stride = _stride_of("pp", self.order_tokens, self.dense_sizes())
        expert_stride = _stride_of("pp", self.order_tokens, self.expert_sizes())
        if dense_stride != expert_stride:
            out.append(
                f"rank order {self.order!r} puts pp before dp, so dense and expert layers would place pipeline "
                f"stages on different ranks (expert-dp {self.edp} != dp {self.dp}); use an order ending in pp "
                f"(drop --use-tp-pp-dp-mapping) or make {FLAGS['etp']} x {FLAGS['ep']} equal tp*cp = "
                f"{self.tp * self.cp}"
            )
        return out

    # Flags --------------------------------------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        """Add Megatron-LM's parallelism flags (and short aliases) to `parser`."""
        g = parser.add_argument_group("parallelism", "Megatron-LM's parallel-size flags")
        g.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
        g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
        g.add_argument("--virtual-pipeline-model-parallel-size", "--vpp", dest="vpp", type=int, default=None)
        g.add_argument("--context-parallel-size", "--cp", dest="cp", type=int, default=1)
        g.add_argument("--expert-model-parallel-size", "--ep", dest="ep", type=int, default=1)
        g.add_argument("--expert-tensor-parallel-size", "--etp", dest="etp", type=int, default=None,
                       help="default: same as --tensor-model-parallel-size")
        g.add_argument("--sequence-parallel", action="store_true")
        g.add_argument("--use-tp-pp-dp-mapping", action="store_true",
                       help=f"rank order {TP_PP_DP_ORDER} instead of {DEFAULT_ORDER}")
        g.add_argument("--rank-order", default=None, help=f"explicit rank order, leftmost fastest (default {DEFAULT_ORDER})")
        return g

    @classmethod
    def from_args(cls, args: argparse.Namespace, world_size: int) -> "ParallelConfig":
        """Build (and validate) the config from parsed flags and the launched world size."""
        if args.rank_order and args.use_tp_pp_dp_mapping:
            raise ValueError("give either --rank-order or --use-tp-pp-dp-mapping, not both")
        order = args.rank_order or (TP_PP_DP_ORDER if args.use_tp_pp_dp_mapping else DEFAULT_ORDER)
        return cls(world_size=world_size, tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, etp=args.etp,
                   vpp=args.vpp, sequence_parallel=args.sequence_parallel, order=order)


def _stride_of(token: str, order: tuple[str, ...], sizes: dict[str, int]) -> int:
    stride = 1
    for t in order:
        if t == token:
            return stride
        stride *= sizes[t]
    raise KeyError(token)
