"""RankLayout: which ranks form which process group, computed in pure Python (no torch.distributed).

The enumeration is Megatron-Core's (design/megatron-facts.md, section 2.1), so the groups, and the order of ranks
inside each group, equal Megatron-Core's for the same sizes and order string; placement advice written for
Megatron carries over unchanged.

A rank is a mixed-radix number over the ordered axis sizes, leftmost axis fastest:
    rank = sum_i index_i * stride_i,   stride_i = prod_{j < i} size_j.
The groups of a set of axes ("tp-dp", say) are the sets of ranks that agree on every *other* axis. Each group
lists its ranks by their mixed-radix position over the chosen axes, and the groups are listed by their
mixed-radix position over the other axes.

The same ranks are decomposed twice: dense layers as tp-cp-dp-pp, expert layers as etp-ep-edp-pp (Megatron's
"MoE parallel folding"). The pipeline groups of the two decompositions are the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from typing import Sequence

from megamoe.parallel.config import ParallelConfig

# Group kinds built from the dense decomposition: name -> the order tokens it spans.
DENSE_GROUPS = {
    "tp": "tp",
    "cp": "cp",
    "dp": "dp",
    "dp_cp": "dp-cp",
    "pp": "pp",
    "mp": "tp-pp",
    "tp_cp": "tp-cp",
    "tp_dp_cp": "tp-dp-cp",
}
# Group kinds built from the expert decomposition (its "tp" token is etp, its "dp" token is edp).
EXPERT_GROUPS = {
    "ep": "ep",
    "etp": "tp",
    "edp": "dp",
    "tp_ep": "tp-ep",
    "tp_ep_pp": "tp-ep-pp",
}
# Every group kind, in the order the mesh creates them (and the JSON lists them).
GROUP_KINDS = (
    "tp", "pp", "dp", "dp_cp", "cp", "mp", "tp_cp", "tp_dp_cp", "embd", "pos_embd",
    "ep", "etp", "edp", "tp_ep", "tp_ep_pp",
)
# Coordinates reported per rank: dense axes, then expert axes.
DENSE_AXES = ("tp", "cp", "dp", "pp")
EXPERT_AXES = ("etp", "ep", "edp")


def orthogonal_groups(sizes: Sequence[int], chosen: Sequence[bool]) -> list[list[int]]:
    """All groups spanning the `chosen` axes of a mixed-radix rank space.

    Args:
        sizes: axis sizes, leftmost fastest; the world is their product.
        chosen: which axes the groups span.

    Returns:
        prod(sizes) / prod(chosen sizes) groups. Group g holds the ranks whose unchosen coordinates are the
        mixed-radix digits of g; inside it, member m has the chosen coordinates given by the digits of m.
    """
    strides = [prod(sizes[:i]) for i in range(len(sizes))]
    inner = [(s, d) for s, d, c in zip(sizes, strides, chosen) if c]
    outer = [(s, d) for s, d, c in zip(sizes, strides, chosen) if not c]

    def offset(index: int, axes: list[tuple[int, int]]) -> int:
        # Digits of `index` over the axes' sizes (first fastest), mapped back through the global strides.
        total = 0
        for size, stride in axes:
            total += (index % size) * stride
            index //= size
        return total

    group_size = prod(s for s, _ in inner)
    num_groups = prod(s for s, _ in outer)
    return [[offset(g, outer) + offset(m, inner) for m in range(group_size)] for g in range(num_groups)]


def _coordinates(rank: int, order: Sequence[str], sizes: dict[str, int]) -> dict[str, int]:
    coords = {}
    for token in order:
        coords[token] = rank % sizes[token]
        rank //= sizes[token]
    return coords


@dataclass(frozen=True)
class RankLayout:
    """The process groups of a ParallelConfig and each rank's coordinates. Pure data; build with from_config."""

    config: ParallelConfig
    groups: dict[str, list[list[int]]]

    @classmethod
    def from_config(cls, config: ParallelConfig) -> "RankLayout":
        order = config.order_tokens
        groups: dict[str, list[list[int]]] = {}
        for kinds, sizes in ((DENSE_GROUPS, config.dense_sizes()), (EXPERT_GROUPS, config.expert_sizes())):
            ordered_sizes = [sizes[t] for t in order]
            for name, tokens in kinds.items():
                spanned = set(tokens.split("-"))
                groups[name] = orthogonal_groups(ordered_sizes, [t in spanned for t in order])
        # The word embedding lives on the first and last stage (tied weights' gradients are summed there); the
        # position embedding on the first stage only.
        groups["embd"] = [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in groups["pp"]]
        groups["pos_embd"] = [[g[0]] for g in groups["pp"]]
        expert_pp = orthogonal_groups([config.expert_sizes()[t] for t in order], [t == "pp" for t in order])
        if expert_pp != groups["pp"]:  # ParallelConfig's validation rules this out; kept as a guard
            raise AssertionError("dense and expert decompositions disagree on pipeline groups")
        return cls(config=config, groups={k: groups[k] for k in GROUP_KINDS})

    def group_of(self, kind: str, rank: int) -> list[int] | None:
        """The group of `kind` that holds `rank` (None for embd/pos_embd when the rank holds no embedding)."""
        for group in self.groups[kind]:
            if rank in group:
                return group
        return None

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index on every dense axis (tp, cp, dp, pp) and expert axis (etp, ep, edp)."""
        cfg = self.config
        dense = _coordinates(rank, cfg.order_tokens, cfg.dense_sizes())
        expert = _coordinates(rank, cfg.order_tokens, cfg.expert_sizes())
        return {"tp": dense["tp"], "cp": dense["cp"], "dp": dense["dp"], "pp": dense["pp"],
                "etp": expert["tp"], "ep": expert["ep"], "edp": expert["dp"]}

    def virtual_stages(self, rank: int) -> list[int]:
        """Global indices of the model chunks this rank runs: stage + chunk * pp for each of its vpp chunks."""
        stage, pp = self.coordinates(rank)["pp"], self.config.pp
        return [stage + chunk * pp for chunk in range(self.config.vpp or 1)]

    # Presentation --------------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        """{"groups": {kind: [[ranks...], ...]}, "dp": N, "edp": N}."""
        return {"groups": {k: self.groups[k] for k in GROUP_KINDS}, "dp": self.config.dp, "edp": self.config.edp}

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict())

    def format_table(self) -> str:
        """A per-rank table of coordinates and pipeline stage, then every group kind."""
        cfg = self.config
        lines = [
            f"world {cfg.world_size} = tp {cfg.tp} x cp {cfg.cp} x dp {cfg.dp} x pp {cfg.pp} (dense)"
            f" = etp {cfg.etp} x ep {cfg.ep} x edp {cfg.edp} x pp {cfg.pp} (expert);"
            f" order {'-'.join(cfg.order_tokens)}; vpp {cfg.vpp or 1}; sequence parallel {'on' if cfg.sequence_parallel else 'off'}",
            "",
        ]
        header = ["rank", *DENSE_AXES, "|", *EXPERT_AXES, "|", "stage", "chunks"]
        rows = []
        for rank in range(cfg.world_size):
            c = self.coordinates(rank)
            chunks = ",".join(map(str, self.virtual_stages(rank)))
            rows.append([str(rank), *(str(c[a]) for a in DENSE_AXES), "|", *(str(c[a]) for a in EXPERT_AXES), "|",
                         str(c["pp"]), chunks])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip())
        lines.append("")
        lines.append("groups:")
        name_width = max(map(len, GROUP_KINDS))
        for kind in GROUP_KINDS:
            lines.append(f"  {kind.ljust(name_width)}  {self.groups[kind]}")
        return "\n".join(lines)
