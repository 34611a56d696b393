"""Pipeline parallelism trains the same model as one process: losses per micro-batch and parameters after three
SGD steps, for 1F1B and interleaved schedules, with tp / sp, ep and dp, tied and untied embeddings, uneven splits
and per-token loss; plus the schedule's order and its bad inputs."""

import itertools

import pytest
import torch
import torch.distributed as dist

from megamoe.distributed.finalize import finalize_grads
from megamoe.moe.config import MoEConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from megamoe.pipeline.schedules import forward_backward, stage_actions
from megamoe.pipeline.stages import PipelineSplit, build_model_chunks
from tests.model_cases import SEED, VARIANTS, _padded, make_config, rel

LR = 0.1


def micro_batch(cfg, step, index, b=2):
    g = torch.Generator().manual_seed(1000 * step + index)
    tokens = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    loss_mask = (torch.rand(b, cfg.seq_length, generator=g) > 0.2).float()
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                sample_ids=torch.arange(b) + b * (index + 100 * step))


def train(model_kwargs, parallel, split_kwargs, num_mb, steps=3, per_token=False, forward_only=False,
          record=None):
    """`steps` SGD steps of this rank's chunks; num_mb micro-batches per step, split evenly over dp replicas."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = ParallelMesh(ParallelConfig(world_size=world, **parallel))
    cfg = make_config(**model_kwargs)
    split = PipelineSplit(cfg.num_layers, mesh.config.pp, mesh.config.vpp, **split_kwargs)
    chunks = build_model_chunks(cfg, mesh, split, seed=SEED)
    replica = mesh.coordinates["dp"]
    per_mb = num_mb // mesh.config.dp
    losses = []
    for step in range(steps):
        batches = [micro_batch(cfg, step, replica * per_mb + m) for m in range(per_mb)]
        out = forward_backward(chunks, batches, mesh, per_token_loss=per_token, forward_only=forward_only,
                               record=record)
        losses.append({replica * per_mb + m: (s.item(), n.item()) for m, (s, n) in enumerate(out.losses)})
        if forward_only:
            continue
        finalize_grads(chunks, mesh, out.num_tokens() if per_token else None)
        with torch.no_grad():
            for chunk in chunks:
                for p in chunk.parameters():
                    p -= LR * p.grad
                    p.grad = None
    params = {n: (p.detach(), p.spec) for c in chunks for n, p in c.named_parameters()}
    return {"losses": losses, "params": params, "coords": mesh.coordinates}


def check_pipeline(model_kwargs, parallel, split_kwargs, num_mb, results, per_token=False):
    reference = train(model_kwargs, {}, {}, num_mb, per_token=per_token)  # num_mb: the step's total
    for step, ref_losses in enumerate(reference["losses"]):
        seen = {}
        for r in results:
            seen.update(r["losses"][step])
        assert sorted(seen) == sorted(ref_losses), f"step {step}: micro-batches {sorted(seen)}"
        for m, (s, n) in ref_losses.items():
            assert seen[m][1] == n and abs(seen[m][0] - s) <= 1e-5 * abs(s), f"step {step} micro-batch {m}"
    ref_params = {n: p for n, (p, _) in reference["params"].items()}
    for r in results:
        for name, (piece, spec) in r["params"].items():
            source = ref_params.get(name, ref_params["embedding.word_embeddings.weight"])  # tied output copy
            expected = spec.take_local(_padded(source, spec.global_shape))
            assert rel(piece, expected) < 1e-5, f"{name} after training"


def _body(model_kwargs, parallel, split_kwargs, num_mb, per_token=False):
    return train(model_kwargs, parallel, split_kwargs, num_mb, per_token=per_token)


def model(variant="gpt", num_layers=4, moe=None):
    kwargs = dict(VARIANTS[variant], num_layers=num_layers)
    if moe:
        kwargs["moe"] = MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=0.01, **moe)
    return kwargs


MOE = dict(token_dispatcher_type="alltoall")
CASES = {
    "pp2-m2-tied": (2, dict(pp=2), model("gpt"), {}, 2),
    "pp2-m5-untied": (2, dict(pp=2), model("mixtral"), {}, 5),
    "pp2-vpp2-m5-tied": (2, dict(pp=2, vpp=2), model("gpt"), {}, 5),
    "pp4-m4-tied": (4, dict(pp=4), model("gpt"), {}, 4),
    "pp4-vpp2-m9-untied": (4, dict(pp=4, vpp=2), model("mixtral", 8), {}, 9),
    "pp2-vpp2-tp2sp-moe-ep2": (4, dict(pp=2, vpp=2, tp=2, sequence_parallel=True, ep=2, etp=1),
                               model("mixtral", moe=MOE), {}, 5),
    "pp2-ep2-dp2-moe": (4, dict(pp=2, ep=2), model("mixtral", moe=MOE), {}, 4),
    "pp2-uneven-1-3": (2, dict(pp=2), model("mixtral"), dict(first_stage_layers=1, last_stage_layers=3), 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_equals_single_process(dist_run, case):
    world, parallel, kwargs, split, num_mb = CASES[case]
    check_pipeline(kwargs, parallel, split, num_mb, dist_run(world, _body, kwargs, parallel, split, num_mb))


def test_per_token_loss_equals_single_process(dist_run):
    parallel, kwargs = dict(pp=2, ep=2), model("mixtral", moe=MOE)
    results = dist_run(4, _body, kwargs, parallel, {}, 4, True)
    check_pipeline(kwargs, parallel, {}, 4, results, per_token=True)


FULL = [(pp, vpp, tp, ep, variant, m) for pp, vpp, tp, ep, variant, m in itertools.product(
    (2, 4), (1, 2), (1, 2), (1, 2), ("gpt", "mixtral"), ("pp", "2pp+1")) if pp * tp * max(ep // tp, 1) <= 8]


@pytest.mark.full
@pytest.mark.parametrize("pp, vpp, tp, ep, variant, m", FULL)
def test_pipeline_matrix(dist_run, pp, vpp, tp, ep, variant, m):
    num_mb = pp if m == "pp" else 2 * pp + 1
    world = pp * tp * max(ep // tp, 1)
    parallel = dict(pp=pp, vpp=vpp if vpp > 1 else None, tp=tp, ep=ep, etp=1, sequence_parallel=tp > 1)
    moe = MOE if ep > 1 or tp > 1 else None
    kwargs = model("mixtral" if moe else variant, num_layers=pp * vpp * (1 if pp * vpp > 4 else 2), moe=moe)
    if ParallelConfig(world_size=world, **parallel).dp > 1:
        num_mb *= ParallelConfig(world_size=world, **parallel).dp
    check_pipeline(kwargs, parallel, {}, num_mb, dist_run(world, _body, kwargs, parallel, {}, num_mb))


def _forward_only_body(kwargs, parallel):
    trained = train(kwargs, parallel, {}, 4, steps=1, forward_only=True)
    return trained["losses"][0]


def test_forward_only_gives_the_training_forward_loss(dist_run):
    kwargs, parallel = model("mixtral", 8), dict(pp=4, vpp=2)
    seen = {}
    for losses in dist_run(4, _forward_only_body, kwargs, parallel):
        seen.update(losses)
    reference = train(kwargs, {}, {}, 4, steps=1)["losses"][0]
    assert sorted(seen) == sorted(reference)
    for m, (s, n) in reference.items():
        assert abs(seen[m][0] - s) <= 1e-5 * abs(s) and seen[m][1] == n


def expected_interleaved_order(stage, pp, vpp, m):
    """Megatron-LM's classic interleaved order for m divisible by pp, written from its formulas: the k-th
    forward of a stage is micro-batch (k // (pp vpp)) pp + k % pp in chunk (k % (pp vpp)) // pp; backwards visit
    chunks in reverse; warm-up 2 (pp - stage - 1) + (vpp - 1) pp."""
    total = m * vpp

    def forward(k):
        chunk = (k % (pp * vpp)) // pp
        return ("F", (k // (pp * vpp)) * pp + k % pp, chunk * pp + stage)

    def backward(k):
        chunk = vpp - 1 - (k % (pp * vpp)) // pp
        return ("B", (k // (pp * vpp)) * pp + k % pp, chunk * pp + stage)

    warmup = min(2 * (pp - stage - 1) + (vpp - 1) * pp, total)
    order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    return order + [backward(k) for k in range(total - warmup, total)]


def _record_body(kwargs, parallel, num_mb):
    record = []
    train(kwargs, parallel, {}, num_mb, steps=1, record=record)
    return record


def test_interleaved_schedule_order(dist_run):
    pp, vpp, num_mb = 4, 2, 8
    records = dist_run(4, _record_body, model("gpt", 8), dict(pp=pp, vpp=vpp), num_mb)
    for stage, record in enumerate(records):
        actions = [tuple(a) for a in record if a[0] in ("F", "B")]
        assert actions == expected_interleaved_order(stage, pp, vpp, num_mb)
        assert [(a.kind, a.micro_batch, a.virtual_stage) for a in stage_actions(stage, pp, vpp, num_mb, False)] \
            == actions
        # activations go to the next stage and gradients to the previous one, around the ring
        for entry in record:
            if entry[0] == "X":
                assert set(entry[1]) <= {(stage + 1) % pp, (stage - 1) % pp}


def test_1f1b_order_by_hand():
    assert [f"{a.kind}{a.micro_batch}" for a in stage_actions(0, 4, 1, 6, False)] == \
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5".split()
    assert [f"{a.kind}{a.micro_batch}" for a in stage_actions(3, 4, 1, 6, False)] == \
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5".split()


def test_bad_pipeline_inputs():
    with pytest.raises(ValueError, match="--num-layers 6 is not divisible by --pipeline-model-parallel-size x "
                                         "--virtual-pipeline-model-parallel-size = 4"):
        PipelineSplit(6, 2, 2)
    with pytest.raises(ValueError, match="must split evenly over the 2 other stages"):
        PipelineSplit(8, 4, first_stage_layers=1, last_stage_layers=2)
    with pytest.raises(ValueError, match="cannot be combined with --virtual-pipeline"):
        PipelineSplit(8, 2, 2, first_stage_layers=2)
    assert [list(r) for r in PipelineSplit(8, 4, first_stage_layers=1, last_stage_layers=3).stage_layers()] == \
        [[0], [1, 2], [3, 4], [5, 6, 7]]


def _too_few_microbatches():
    mesh = ParallelMesh(ParallelConfig(world_size=2, pp=2, vpp=2))
    cfg = make_config(**model("gpt"))
    chunks = build_model_chunks(cfg, mesh, PipelineSplit(4, 2, 2), seed=SEED)
    try:
        forward_backward(chunks, [micro_batch(cfg, 0, 0)], mesh)
    except ValueError as err:
        return str(err)


def test_interleaving_needs_pp_microbatches(dist_run):
    for message in dist_run(2, _too_few_microbatches):
        assert "the interleaved schedule needs at least --pipeline-model-parallel-size (2) micro-batches" in message
