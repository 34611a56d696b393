"""A trained model ready for evaluation or generation: pretrain_gpt.py's model, parallel and tokenizer flags plus
--load, checked before any collective, then the model chunks built for this rank's layout and loaded."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.checkpoint.checkpointer import CheckpointConfig, check_model_shapes, find_checkpoint, load_checkpoint
from megamoe.checkpoint.hf import model_config_from_dict
from megamoe.data.tokenizers import Tokenizer, tokenizer_from_args
from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.world import init_distributed, read_launch_env
from megamoe.pipeline.stages import PipelineSplit, build_model_chunks
from megamoe.training.allocator import keep_freed_memory


@dataclass
class LoadedModel:
    """This rank's model chunks (in eval mode) and what they were built from."""

    mesh: ParallelMesh
    model: ModelConfig
    chunks: list
    tokenizer: Tokenizer
    checkpoint: str
    created_world: bool

    def close(self) -> None:
        if self.created_world:
            dist.destroy_process_group()


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Validate the flags and the checkpoint of --load on every rank, then start torch.distributed (if the
    launcher did not), build this rank's chunks and load them. The model flags may be left out: they are read from
    the checkpoint (a flag given must agree with it)."""
    world_size = dist.get_world_size() if dist.is_initialized() else read_launch_env().world_size
    parallel = ParallelConfig.from_args(args, world_size)
    tokenizer = tokenizer_from_args(args)
    if not args.load:
        raise ValueError("--load <checkpoint directory> is required")
    found = find_checkpoint(CheckpointConfig(load=args.load, ckpt_step=args.ckpt_step))
    if found is None:
        raise FileNotFoundError(f"--load {args.load} holds no checkpoint")
    if args.num_layers is None:  # the checkpoint's model, with this run's sequence length, capacity and kernels
        saved = model_config_from_dict(found.common["model"])
        moe = saved.moe and dataclasses.replace(
            saved.moe, eval_capacity_factor=args.moe_eval_capacity_factor,
            eval_capacity_token_fraction=args.moe_eval_capacity_token_fraction,
            token_dispatcher_type=args.moe_token_dispatcher_type, grouped_gemm=args.moe_grouped_gemm)
        model = dataclasses.replace(saved, seq_length=args.seq_length or saved.seq_length, moe=moe,
                                    hidden_dropout=0.0, attention_dropout=0.0,
                                    attention_backend=args.attention_backend, torch_compile=args.torch_compile)
    else:
        model = ModelConfig.from_args(args, tokenizer.vocab_size, MoEConfig.from_args(args))
    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's model "
                         f"{model.vocab_size}: give the tokenizer the model was trained with (--tokenizer-model)")
    model.check_layout(parallel)
    check_model_shapes(found, model)
    split = PipelineSplit(model.num_layers, parallel.pp, parallel.vpp, args.decoder_first_pipeline_num_layers,
                          args.decoder_last_pipeline_num_layers)
    created = not dist.is_initialized()
    if created and not torch.cuda.is_available():  # only when this process is the tool's own job
        keep_freed_memory()
    init_distributed()
    mesh = ParallelMesh(parallel)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    chunks = build_model_chunks(model, mesh, split, seed=args.seed, dtype=dtype)
    load_checkpoint(found, chunks, None, mesh)
    for chunk in chunks:
        chunk.eval()
    return LoadedModel(mesh, model, chunks, tokenizer, found.path, created)
