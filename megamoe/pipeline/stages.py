"""Which global layers each pipeline stage (and each of its virtual chunks) holds, and building those chunks.

With pp stages and vpp chunks per stage, the model is cut into pp x vpp virtual stages of consecutive layers;
virtual stage v = chunk c x pp + stage r runs on stage r as its chunk c (Megatron-LM's interleaving), so
activations go round the ring of stages vpp times. Layer numbers stay global: layer 17 is layer 17 everywhere.

Uneven splits (Megatron-LM's --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers) give the
first and/or last stage a different count, the middle stages sharing the rest evenly; they need vpp unset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.parallel.mesh import ParallelMesh


@dataclass(frozen=True)
class PipelineSplit:
    """How num_layers are cut into pp stages x vpp chunks.

    Attributes:
        num_layers, pp, vpp: sizes (vpp None or 1: no interleaving).
        first_stage_layers, last_stage_layers: uneven first / last stage sizes, or None.
    """

    num_layers: int
    pp: int
    vpp: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid pipeline split:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        out = []
        chunks = self.pp * (self.vpp or 1)
        uneven = self.first_stage_layers is not None or self.last_stage_layers is not None
        if uneven:
            if self.vpp not in (None, 1):
                out.append("--decoder-first/last-pipeline-num-layers cannot be combined with "
                           "--virtual-pipeline-model-parallel-size yet")
            if self.pp < 2:
                out.append("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
            first, last = self.first_stage_layers or 0, self.last_stage_layers or 0
            middle = self.pp - (self.first_stage_layers is not None) - (self.last_stage_layers is not None)
            rest = self.num_layers - first - last
            if first < 0 or last < 0 or rest < 0 or (middle == 0 and rest != 0) or (middle > 0 and rest % middle):
                out.append(f"--num-layers {self.num_layers} minus the first ({first}) and last ({last}) stage layers "
                           f"must split evenly over the {middle} other stages")
            elif (middle > 0 and rest == 0) or (self.first_stage_layers == 0) or (self.last_stage_layers == 0):
                out.append("every pipeline stage needs at least one layer")
        elif self.num_layers % chunks:
            what = "--pipeline-model-parallel-size x --virtual-pipeline-model-parallel-size" if self.vpp \
                else "--pipeline-model-parallel-size"
            out.append(f"--num-layers {self.num_layers} is not divisible by {what} = {chunks}; change them or use "
                       f"--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
        return out

    def stage_layers(self) -> list[range]:
        """Layers of each virtual stage, in virtual-stage order (v = chunk x pp + stage)."""
        if self.first_stage_layers is None and self.last_stage_layers is None:
            per = self.num_layers // (self.pp * (self.vpp or 1))
            return [range(v * per, (v + 1) * per) for v in range(self.pp * (self.vpp or 1))]
        first, last = self.first_stage_layers, self.last_stage_layers
        middle = self.pp - (first is not None) - (last is not None)
        rest = self.num_layers - (first or 0) - (last or 0)
        middle_sizes = [rest // middle] * middle if middle else []
        sizes = ([first] if first is not None else []) + middle_sizes + ([last] if last is not None else [])
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [range(bounds[i], bounds[i + 1]) for i in range(len(sizes))]

    def chunks_of(self, stage: int) -> list[range]:
        """The layers of each chunk of pipeline stage `stage`, in chunk order."""
        return self.stage_layers()[stage::self.pp]


def build_model_chunks(config: ModelConfig, mesh: ParallelMesh, split: PipelineSplit, *, seed: int = 1234,
                       dtype: torch.dtype = torch.float32) -> list[GPTModel]:
    """This rank's model chunks: one GPTModel per virtual stage it runs, with global layer numbers."""
    if split.pp != mesh.config.pp or (split.vpp or 1) != (mesh.config.vpp or 1):
        raise ValueError(f"the pipeline split (pp {split.pp}, vpp {split.vpp}) does not match the mesh "
                         f"(pp {mesh.config.pp}, vpp {mesh.config.vpp})")
    stages = split.stage_layers()
    chunks = []
    for layers in split.chunks_of(mesh.pp_stage):
        virtual = stages.index(layers)
        chunks.append(GPTModel(config, mesh, seed=seed, layer_numbers=layers, pre_process=virtual == 0,
                               post_process=virtual == len(stages) - 1, dtype=dtype))
    return chunks


def add_pipeline_arguments(parser) -> None:
    g = parser.add_argument_group("pipeline", "uneven pipeline stages (Megatron-LM's flags)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
