"""Save and load training checkpoints with torch.distributed.checkpoint, in Megatron-LM's directory layout.

    <save>/latest_checkpointed_iteration.txt     the last complete checkpoint's iteration
    <save>/iter_0000100/                         one checkpoint: DCP files (.metadata, __<rank>_0.distcp) and
                                                 common.json (iteration, consumed samples, optimizer counters,
                                                 the configs and flags of the run)
A save writes iter_NNNNNNN.tmp/, and rank 0 publishes it (rename, then the tracker, each atomic and fsynced) only
after every rank finished writing, so a run killed at any moment leaves the previous checkpoint loadable. A
leftover .tmp directory is a save that did not finish: loading names it and skips it, the next save of that
iteration replaces it.

Tensors are keyed by global identity (state.py), so a checkpoint saved under any layout loads under any other
(DCP reads each rank's pieces from whatever pieces were saved). Nothing is unpickled: tensors are read with
weights_only=True, the metadata with an allow-list (safe_reader.py), the rest is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemWriter

from megamoe.checkpoint.safe_reader import SafeFileSystemReader, load_metadata
from megamoe.checkpoint.shards import saved_shape
from megamoe.checkpoint.state import model_state, optimizer_state, rng_state
from megamoe.parallel import comm

TRACKER = "latest_checkpointed_iteration.txt"
COMMON = "common.json"
FORMAT = "megamoe-dcp-1"


@dataclass(frozen=True)
class CheckpointConfig:
    """Megatron-LM's checkpoint flags: --save, --load, --save-interval, --no-save-optim, --no-save-rng,
    --no-load-optim, --no-load-rng, --finetune, --ckpt-step, --exit-on-missing-checkpoint.

    With --load equal to --save (resuming a job that may not have saved yet) a missing checkpoint starts the run
    fresh; a separate --load directory must hold one (or the run fails before training, naming the flag)."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    ckpt_step: int | None = None
    exit_on_missing_checkpoint: bool = False
    async_save: bool = False
    moe_use_upcycling: bool = False
    moe_upcycling_granularity: int = 1

    def __post_init__(self) -> None:
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")
        # --save-interval without --save saves nothing, as in Megatron-LM (launch scripts set it unconditionally).
        if self.ckpt_step is not None and not self.load:
            raise ValueError("--ckpt-step needs --load <directory>")
        if self.moe_use_upcycling and not (self.load and self.save):
            raise ValueError("--moe-use-upcycling needs --load <dense checkpoint> and --save <where the MoE model "
                             "goes>")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("checkpointing", "Megatron-LM's checkpoint flags (torch.distributed.checkpoint)")
        g.add_argument("--save", default=None, help="directory to save checkpoints to")
        g.add_argument("--load", default=None, help="directory to load a checkpoint from (its tracker's iteration)")
        g.add_argument("--save-interval", type=int, default=None)
        g.add_argument("--no-save-optim", action="store_true")
        g.add_argument("--no-save-rng", action="store_true")
        g.add_argument("--no-load-optim", action="store_true")
        g.add_argument("--no-load-rng", action="store_true")
        g.add_argument("--finetune", action="store_true", help="load weights only; start at iteration 0")
        g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration instead of the tracker's")
        g.add_argument("--exit-on-missing-checkpoint", action="store_true")
        g.add_argument("--async-save", action="store_true",
                       help="write checkpoints in the background while training goes on")
        g.add_argument("--moe-use-upcycling", action="store_true",
                       help="turn the dense checkpoint of --load into the MoE model of the flags, saved in --save "
                            "(unless --save already has a checkpoint to resume)")
        g.add_argument("--moe-upcycling-granularity", type=int, default=1,
                       help="slices of each dense MLP per expert copy (Megatron's virtual groups)")
        g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist"],
                       help="accepted; megamoe saves torch.distributed.checkpoint")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CheckpointConfig":
        return cls(args.save, args.load, args.save_interval, args.no_save_optim, args.no_save_rng, args.no_load_optim,
                   args.no_load_rng, args.finetune, args.ckpt_step, args.exit_on_missing_checkpoint,
                   args.async_save, args.moe_use_upcycling, args.moe_upcycling_granularity)


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    """The tracker's iteration, or None when there is no tracker."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} should hold an iteration number, found {text[:40]!r}; fix or remove it")
    return int(text)


def partial_checkpoints(root: str) -> list[str]:
    """Directories of saves that did not finish."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("iter_") and d.endswith(".tmp"))


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, COMMON))


# Saving ---------------------------------------------------------------------------------------------------------
# DCP's default planners, taught to find a piece of a GlobalShards by its offsets. Our state dicts are flat
# ({key: GlobalShards}), so no flattening is needed; the load planner skips DCP's meta-tensor initialization,
# which does not know _Checkpointable objects other than DTensor.
class _SavePlanner(DefaultSavePlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if hasattr(obj, "__get_tensor_shard__") else obj


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index):
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if hasattr(obj, "__get_tensor_shard__") else obj


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str, iteration: int, chunks, optimizer, mesh, common: dict, save_optim: bool = True,
                    save_rng: bool = True) -> str:
    """Save this rank's pieces (a collective over all ranks) and publish the checkpoint atomically.

    common: JSON-serializable run state (consumed samples, configs, flags) stored in common.json.
    Returns the checkpoint directory."""
    tmp, state, record = _prepare_save(root, iteration, chunks, optimizer, mesh, common, save_optim, save_rng)
    write_state(state, tmp)
    if mesh.rank == 0:
        publish(root, iteration, record)
    comm.barrier(mesh.world)
    return checkpoint_dir(root, iteration)


def _prepare_save(root, iteration, chunks, optimizer, mesh, common, save_optim, save_rng):
    """Make the (empty) iter_N.tmp directory and this rank's state dict; (tmp, state, common.json record)."""
    tmp = checkpoint_dir(root, iteration) + ".tmp"
    if mesh.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this iteration that did not finish
        os.makedirs(tmp)
    comm.barrier(mesh.world)
    state = model_state(chunks, saving=True)
    with_main = save_optim and not optimizer.main_is_param
    if save_optim:
        state.update(optimizer_state(optimizer, optimizer.state_names + (("main",) if with_main else ()), saving=True))
    if save_rng:
        state.update(rng_state(mesh.rank))
    record = {"optimizer": optimizer.counters(), "saved_optim": save_optim, "saved_main": with_main,
              "saved_rng": save_rng, **common}
    return tmp, state, record


class AsyncSaver:
    """--async-save: the state is copied (a snapshot of this iteration) and written by a background thread over
    a process group of its own, while training goes on. poll() after each iteration publishes the checkpoint once
    every rank's write has finished (one small all-reduce while a save is in flight); finish() waits for it."""

    def __init__(self, mesh) -> None:
        self.mesh = mesh
        self.group = dist.new_group(list(range(mesh.config.world_size)), backend="gloo") \
            if mesh.config.world_size > 1 else None
        self.thread = None
        self.pending: tuple[str, int, dict] | None = None  # (root, iteration, common.json record) in flight
        self.error: BaseException | None = None

    def save(self, root, iteration, chunks, optimizer, common, save_optim=True, save_rng=True) -> None:
        self.finish()
        tmp, state, record = _prepare_save(root, iteration, chunks, optimizer, self.mesh, common, save_optim, save_rng)
        snapshot = {key: shards.snapshot() for key, shards in state.items()}

        def write():
            try:
                write_state(snapshot, tmp, process_group=self.group)
            except BaseException as err:  # raised in the training thread by poll()/finish()
                self.error = err

        self.pending = (root, iteration, record)
        self.thread = threading.Thread(target=write, name=f"async-save-{iteration}", daemon=True)
        self.thread.start()

    def poll(self) -> str | None:
        """Publish the checkpoint in flight if every rank finished writing it; returns its directory then."""
        if self.thread is None:
            return None
        done = torch.tensor([0.0 if self.thread.is_alive() else 1.0])
        comm.all_reduce(done, self.mesh.world, op=comm.ReduceOp.MIN)
        return self._publish() if done.item() == 1.0 else None

    def finish(self) -> str | None:
        """Wait for the checkpoint in flight, if any, and publish it."""
        if self.thread is None:
            return None
        self.thread.join()
        return self._publish()

    def _publish(self) -> str:
        self.thread.join()
        failed = torch.tensor([1.0 if self.error is not None else 0.0])
        comm.all_reduce(failed, self.mesh.world, op=comm.ReduceOp.MAX)
        root, iteration, record = self.pending
        self.thread = None
        if failed.item():
            raise RuntimeError(f"the asynchronous save of iteration {iteration} failed on some rank; the previous "
                               f"checkpoint in {root} is intact") from self.error
        if self.mesh.rank == 0:
            publish(root, iteration, record)
        comm.barrier(self.mesh.world)
        return checkpoint_dir(root, iteration)


def write_state(state: dict, path: str, single_process: bool = False, process_group=None) -> None:
    """DCP-save a state dict of GlobalShards-like objects into `path`: a collective over the world (or
    process_group) when torch.distributed is initialized, unless single_process. Pieces are resolved one at a
    time as they are written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=FileSystemWriter(path, single_file_per_rank=True, sync_files=True,
                                                        thread_count=1),
                 planner=_SavePlanner(), no_dist=single_process or _no_dist(), process_group=process_group)


def read_state(state: dict, path: str, single_process: bool = False) -> None:
    """DCP-load into a state dict of GlobalShards (or plain whole tensors), in place (a collective like
    write_state)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=_LoadPlanner(),
                 no_dist=single_process or _no_dist())


def publish(root: str, iteration: int, record: dict) -> str:
    """Make <root>/iter_N.tmp (fully written) the checkpoint of iteration N: write its common.json, rename it, then
    point the tracker at it, each step atomic and fsynced. Returns the checkpoint directory."""
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    record = {"format": FORMAT, "iteration": iteration, **record}
    _write_atomic(os.path.join(tmp, COMMON), json.dumps(record, indent=1, default=str))
    _fsync_dir(tmp)
    if os.path.isdir(final):  # a re-save of the same iteration: keep it whole until the new one is in place
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    _write_atomic(os.path.join(root, TRACKER), str(iteration))
    _fsync_dir(root)
    return final


# Loading --------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointToLoad:
    """A checkpoint found and checked before training starts: where, which iteration, its common.json and the
    global shapes of its tensors."""

    path: str
    iteration: int
    common: dict
    shapes: dict[str, tuple[int, ...]]
    messages: list[str]


def find_checkpoint(config: CheckpointConfig) -> CheckpointToLoad | None:
    """Locate and read the checkpoint --load asks for (no collective: every rank does the same and fails the same
    way). None when the run starts fresh."""
    if not config.load:
        return None
    root, messages = config.load, []
    for partial in partial_checkpoints(root):
        messages.append(f"ignoring {partial}: a save that did not finish")
    iteration = config.ckpt_step if config.ckpt_step is not None else read_tracker(root)
    if iteration is None:
        what = "does not exist" if not os.path.isdir(root) else f"has no {TRACKER}"
        if config.exit_on_missing_checkpoint or os.path.abspath(root) != os.path.abspath(config.save or ""):
            raise FileNotFoundError(f"--load {root} {what}: point --load at a directory a run saved to with --save, "
                                    f"or leave --load out to start fresh")
        messages.append(f"--load {root} {what}: starting fresh (it is also the --save directory)")
        for m in messages:
            print(m, flush=True)
        return None
    path = checkpoint_dir(root, iteration)
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint {path} is missing or incomplete (no .metadata or {COMMON}); "
                                f"use --ckpt-step to pick another iteration")
    common = json.load(open(os.path.join(path, COMMON)))
    if common.get("format") != FORMAT:
        raise ValueError(f"{path} is not a megamoe checkpoint ({COMMON} format {common.get('format')!r})")
    with open(os.path.join(path, ".metadata"), "rb") as f:
        meta = load_metadata(f)
    shapes = {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}
    return CheckpointToLoad(path, iteration, common, shapes, messages)


def expected_model_shapes(model_config) -> dict[str, tuple[int, ...]]:
    """model/<name> -> global shape for a model config, from a shape-only (meta) single-process model."""
    from megamoe.model.gpt import GPTModel
    from megamoe.parallel.config import ParallelConfig
    from megamoe.parallel.mesh import ParallelMesh

    model = GPTModel(model_config, ParallelMesh(ParallelConfig(world_size=1), device=torch.device("meta"),
                                                  standalone=True),
                     device=torch.device("meta"))
    shapes = {f"model/{n}": saved_shape(p.spec) for n, p in model.named_parameters()}
    shapes.update({f"model/{n}": tuple(b.shape) for n, b in model.named_buffers()})
    return shapes


def check_model_shapes(found: CheckpointToLoad, model_config) -> None:
    """Raise, listing the first differences, when the checkpoint's model tensors differ from the flags' model."""
    expected = expected_model_shapes(model_config)
    saved = {k: v for k, v in found.shapes.items() if k.startswith("model/")}
    problems = [f"{k}: flags give {expected[k]}, checkpoint has {saved[k]}" for k in sorted(expected)
                if k in saved and saved[k] != expected[k]]
    problems += [f"{k}: not in the checkpoint" for k in sorted(set(expected) - set(saved))]
    problems += [f"{k}: in the checkpoint, not in the model of the flags" for k in sorted(set(saved) - set(expected))]
    if problems:
        raise ValueError(f"checkpoint {found.path} does not match the model of the flags (the model flags must equal "
                         f"the saved run's; first differences):\n  - " + "\n  - ".join(problems[:8]))


@torch.no_grad()
def load_checkpoint(found: CheckpointToLoad, chunks, optimizer, mesh, load_optim: bool = True,
                    load_rng: bool = True) -> None:
    """Load a checked checkpoint into this rank's chunks (and optimizer, unless None), whatever layout saved it.
    A collective when torch.distributed is initialized."""
    common = found.common
    load_optim = optimizer is not None and load_optim and common["saved_optim"]
    state = model_state(chunks, saving=False)
    if load_optim:
        state.update(optimizer_state(optimizer, optimizer.state_names, saving=False))
    key = f"rng/rank{mesh.rank}"
    same_layout = common.get("parallel") == dataclasses.asdict(mesh.config)
    if load_rng and common["saved_rng"] and same_layout and key in found.shapes:
        state.update(rng_state(mesh.rank))
    read_state(state, found.path)
    if key in state:
        torch.set_rng_state(state[key].pieces[(0,)])
    # The fp32 main values: the saved ones where the run kept a separate copy, else the saved model values.
    # Loaded after the model, into the main copy (or, for fp32 models, into the parameters themselves).
    source = "optimizer/main" if common["saved_main"] else "model"
    if optimizer is not None and not optimizer.main_is_param:
        read_state(optimizer_state(optimizer, ("main",), saving=False, key_of=lambda slot, name: f"{source}/{name}"),
                   found.path)
        optimizer.write_main_to_params()
    elif common["saved_main"] and (optimizer is None or optimizer.main_is_param) and all(
            p.dtype == torch.float32 for c in chunks for p in c.parameters()):
        main = {"optimizer/main/" + key.removeprefix("model/"): shards
                for key, shards in model_state(chunks, saving=False).items()}
        read_state({key: shards for key, shards in main.items() if key in found.shapes}, found.path)
    if load_optim:
        optimizer.load_counters(common["optimizer"])
