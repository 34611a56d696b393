"""Data parallelism and the optimizer against torch.optim.AdamW in one process: parameters after 5 steps and the
clipped gradient norm at every step, with and without the distributed optimizer and overlap, under dp, tp + sp,
pp and ep; optimizer-state bytes; fp16 loss scaling and bf16 master weights."""

import pytest
import torch
import torch.distributed as dist

from megamoe.distributed.data_parallel import DDPConfig, DistributedDataParallel
from megamoe.distributed.finalize import finalize_grads
from megamoe.model.gpt import GPTModel
from megamoe.moe.config import MoEConfig
from megamoe.optim.lr_scheduler import ScheduleConfig
from megamoe.optim.optimizer import MegatronOptimizer, OptimizerConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from megamoe.pipeline.schedules import forward_backward
from megamoe.pipeline.stages import PipelineSplit, build_model_chunks
from tests.distributed.test_pipeline import micro_batch
from tests.model_cases import SEED, VARIANTS, _padded, make_config, rel

STEPS, MICRO_BATCHES, LR, WD = 5, 4, 1e-2, 0.1
# Some gradients are exactly zero in exact arithmetic (attention key biases: a key bias shifts every score of a
# query equally), so both runs hold only round-off there; Adam's normalization would turn that noise into
# updates. An epsilon well above round-off keeps them zero in both runs.
EPS = 1e-4
SCHEDULE = ScheduleConfig(lr=LR, decay_iters=100, decay_style="constant", start_weight_decay=WD,
                          end_weight_decay=WD)


def train_megamoe(model_kwargs, parallel, ddp_kwargs, clip):
    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = ParallelMesh(ParallelConfig(world_size=world, **parallel))
    cfg = make_config(**model_kwargs)
    chunks = build_model_chunks(cfg, mesh, PipelineSplit(cfg.num_layers, mesh.config.pp, mesh.config.vpp), seed=SEED)
    ddp_config = DDPConfig(**ddp_kwargs)
    ddps = [DistributedDataParallel(c, mesh, ddp_config) for c in chunks]
    opt = MegatronOptimizer(ddps, mesh, OptimizerConfig(clip_grad=clip, adam_beta2=0.95, adam_eps=EPS,
                                                        use_distributed_optimizer=ddp_config.use_distributed_optimizer),
                            SCHEDULE)
    per_replica = MICRO_BATCHES // mesh.config.dp
    replica = mesh.coordinates["dp"]
    norms = []
    for step in range(STEPS):
        batches = [micro_batch(cfg, step, replica * per_replica + m) for m in range(per_replica)]
        forward_backward(chunks, batches, mesh, ddps=ddps)
        finalize_grads(chunks, mesh, ddps=ddps)
        norms.append(opt.step()[1])
        opt.zero_grad(ddps)
    for ddp in ddps:
        ddp.finish_param_sync()
    params = {n: (p.detach().clone(), p.spec) for c in chunks for n, p in c.named_parameters()}
    sizes = [(b.grad.numel(), sum(p.numel() for p in b.offsets), b.group.size, len(b.buckets))
             for d in ddps for b in d.buffers]
    return {"params": params, "norms": norms, "state_bytes": opt.state_bytes(), "sizes": sizes}


def train_torch(model_kwargs, clip):
    """One process: the same micro-batches, torch.optim.AdamW and torch's clipping."""
    cfg = make_config(**model_kwargs)
    model = GPTModel(cfg, ParallelMesh(ParallelConfig(world_size=1)), seed=SEED)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=EPS)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        forward_backward([model], [micro_batch(cfg, step, m) for m in range(MICRO_BATCHES)],
                         ParallelMesh(ParallelConfig(world_size=1)))
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")).item())
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}, norms


def _body(model_kwargs, parallel, ddp_kwargs, clip):
    return train_megamoe(model_kwargs, parallel, ddp_kwargs, clip)


def check(model_kwargs, results, clip, tolerance=1e-6):
    ref_params, ref_norms = train_torch(model_kwargs, clip)
    for r in results:
        for got, want in zip(r["norms"], ref_norms):
            assert got == pytest.approx(want, rel=1e-5)
        for name, (piece, spec) in r["params"].items():
            source = ref_params.get(name, ref_params["embedding.word_embeddings.weight"])
            assert rel(piece, spec.take_local(_padded(source, spec.global_shape))) < tolerance, name


MOE = dict(VARIANTS["mixtral"], moe=MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=0.01,
                                              token_dispatcher_type="alltoall"))
DO, OVERLAP = dict(use_distributed_optimizer=True), dict(overlap_grad_reduce=True, bucket_size=2000)
CASES = {
    "dp1-tp2sp-do": (2, dict(tp=2, sequence_parallel=True), VARIANTS["mixtral"], DO),
    "dp2": (2, dict(), VARIANTS["gpt"], {}),
    "dp2-do": (2, dict(), VARIANTS["gpt"], DO),
    "dp2-do-overlap": (2, dict(), VARIANTS["mixtral"], dict(**DO, **OVERLAP)),
    "dp4-do-overlap": (4, dict(), VARIANTS["gpt"], dict(**DO, **OVERLAP)),
    "dp4-overlap": (4, dict(), VARIANTS["mixtral"], OVERLAP),
    "tp2sp-ep2-moe-dp2-do": (4, dict(tp=2, ep=2, etp=1, sequence_parallel=True), MOE, dict(**DO, **OVERLAP)),
    "pp2-tied-dp2-do-overlap": (4, dict(pp=2), VARIANTS["gpt"], dict(**DO, **OVERLAP)),
    "pp2-vpp2-dp2-do-overlap": (4, dict(pp=2, vpp=2), dict(VARIANTS["mixtral"], num_layers=4), dict(**DO, **OVERLAP)),
    "ep4-moe-do": (4, dict(ep=4), MOE, DO),
}


@pytest.mark.parametrize("clip", [0.0, 0.5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_equals_torch_adamw(dist_run, case, clip):
    world, parallel, kwargs, ddp = CASES[case]
    # With tp + SP the reduce-scatter sums in another order than one process; Adam's normalization lifts that
    # fp32 round-off to about 1e-6 on rarely used embedding rows after 5 steps.
    tolerance = 2e-6 if parallel.get("tp", 1) > 1 else 1e-6
    check(kwargs, dist_run(world, _body, kwargs, parallel, ddp, clip), clip, tolerance)


def test_overlap_changes_nothing(dist_run):
    plain = dist_run(4, _body, VARIANTS["mixtral"], {}, dict(**DO, bucket_size=2000), 0.5)
    overlapped = dist_run(4, _body, VARIANTS["mixtral"], {}, dict(**DO, **OVERLAP), 0.5)
    for a, b in zip(plain, overlapped):
        assert a["norms"] == b["norms"]
        for name, (piece, _) in a["params"].items():
            assert torch.equal(piece, b["params"][name][0]), name


def test_distributed_optimizer_state_bytes(dist_run):
    for r in dist_run(4, _body, VARIANTS["gpt"], {}, dict(**DO, bucket_size=3000), 0.0):
        # Adam's two fp32 moments for this rank's shard of every bucket: padded buffer / dp x 2 x 4 bytes.
        assert r["state_bytes"] == sum(padded // dp * 2 * 4 for padded, _, dp, _ in r["sizes"])
        for padded, used, dp, buckets in r["sizes"]:
            assert used <= padded < used + buckets * dp  # padding: less than one group size per bucket
    replicated = dist_run(4, _body, VARIANTS["gpt"], {}, dict(bucket_size=3000), 0.0)[0]
    assert replicated["state_bytes"] == sum(padded * 2 * 4 for padded, *_ in replicated["sizes"])


def _tiny_optimizer(dtype, optimizer_kwargs, schedule=SCHEDULE):
    mesh = ParallelMesh(ParallelConfig(world_size=1))
    model = GPTModel(make_config(**VARIANTS["mixtral"]), mesh, seed=SEED, dtype=dtype)
    ddp = DistributedDataParallel(model, mesh, DDPConfig())
    return model, ddp, MegatronOptimizer([ddp], mesh, OptimizerConfig(**optimizer_kwargs), schedule)


def test_fp16_skips_steps_on_inf_and_backs_off_with_hysteresis():
    model, ddp, opt = _tiny_optimizer(torch.float16, dict(fp16=True, initial_loss_scale=1024.0, hysteresis=2,
                                                          loss_scale_window=3))
    weight = model.decoder.layers["0"].mlp.linear_fc2.weight
    before = weight.detach().clone()

    def step(inject_inf):
        ddp.zero_grad(set_to_none=False)  # gradients written by hand below
        weight.main_grad.fill_(opt.loss_scale * 1e-3)
        if inject_inf:
            weight.main_grad[0, 0] = float("inf")
        return opt.step()[0]

    assert step(True) is False and opt.loss_scale == 1024.0 and opt.skipped_iterations == 1  # hysteresis 2 -> 1
    assert torch.equal(weight, before)                                                       # nothing applied
    assert step(True) is False and opt.loss_scale == 512.0 and opt.skipped_iterations == 2   # hysteresis spent
    assert step(False) is True and not torch.equal(weight, before)
    assert step(False) and step(False) and opt.loss_scale == 1024.0                          # 3 clean steps: x2


def test_sgd_with_momentum_and_weight_decay_equals_torch():
    """SGD's weight decay (coupled, not on 1-D parameters) and momentum against torch.optim.SGD."""
    schedule = ScheduleConfig(lr=0.05, decay_iters=10, decay_style="constant", start_weight_decay=0.1,
                              end_weight_decay=0.1)
    model, ddp, opt = _tiny_optimizer(torch.float32, dict(optimizer="sgd", sgd_momentum=0.9, clip_grad=0.0),
                                      schedule)
    params = dict(model.named_parameters())
    ref = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    torch_sgd = torch.optim.SGD([{"params": [p for p in ref.values() if p.dim() > 1], "weight_decay": 0.1},
                                 {"params": [p for p in ref.values() if p.dim() <= 1], "weight_decay": 0.0}],
                                lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ddp.zero_grad(set_to_none=False)  # gradients written by hand below
        for n, p in params.items():
            grad = torch.randn(p.shape, generator=g)
            p.main_grad.copy_(grad)
            ref[n].grad = grad.clone()
        opt.step()
        torch_sgd.step()
    for n, p in params.items():
        assert rel(p.detach(), ref[n].detach()) < 1e-6, n


def test_bf16_keeps_fp32_master_weights_so_tiny_updates_add_up():
    model, ddp, opt = _tiny_optimizer(torch.bfloat16, dict(bf16=True, optimizer="sgd", sgd_momentum=0.0,
                                                           clip_grad=0.0),
                                      ScheduleConfig(lr=1e-4, decay_iters=10, decay_style="constant",
                                                     start_weight_decay=0.0, end_weight_decay=0.0))
    norm = model.decoder.final_layernorm.weight  # starts at 1.0; bf16 cannot store 1 - 1e-4
    assert norm.dtype == torch.bfloat16 and all(r.main.dtype == torch.float32 for r in opt.regions)
    for _ in range(100):
        ddp.zero_grad(set_to_none=False)  # gradients written by hand below
        norm.main_grad.fill_(1.0)
        opt.step()
    region = opt.regions[0]
    offset = region.buffer.offsets[norm]
    assert region.main[offset].item() == pytest.approx(1.0 - 100 * 1e-4, rel=1e-5)  # fp32 sums of 1e-4
    assert norm[0].item() < 1.0  # the fp32 master value reached the bf16 weight


@pytest.mark.parametrize("overlap", [False, True])
def test_zero_grad_is_lazy_but_parameters_without_a_gradient_read_zero(overlap):
    """zero_grad() fills nothing: a step's first gradient overwrites main_grad. A parameter that gets no gradient
    in a step must still read zero after finalize_grads, not the previous step's gradient."""
    mesh = ParallelMesh(ParallelConfig(world_size=1))
    cfg = make_config(**VARIANTS["mixtral"])
    model = GPTModel(cfg, mesh, seed=SEED)
    ddp = DistributedDataParallel(model, mesh, DDPConfig(overlap_grad_reduce=overlap, bucket_size=2000))
    forward_backward([model], [micro_batch(cfg, 0, 0)], mesh, ddps=[ddp])
    finalize_grads([model], mesh, ddps=[ddp])
    params = dict(model.named_parameters())
    assert all(p.main_grad.abs().sum() > 0 for p in params.values())  # every parameter got a gradient
    ddp.zero_grad()
    # Step 2: only the output layer and the final norm get a gradient (twice: a second micro-batch adds).
    touched = ("output_layer.weight", "decoder.final_layernorm.weight")
    for scale in (1.0, 2.0):
        (sum(params[n].float().square().sum() for n in touched) * scale).backward()
    finalize_grads([model], mesh, ddps=[ddp])
    for name, p in params.items():
        expected = 6 * p.detach() if name in touched else torch.zeros_like(p)
        assert torch.allclose(p.main_grad, expected, rtol=1e-6, atol=0), name
    # set_to_none=False: zeros now, so a gradient written by hand survives finalize_grads and gradients add.
    ddp.zero_grad(set_to_none=False)
    by_hand = params["decoder.layers.0.self_attention.linear_proj.weight"]
    by_hand.main_grad.fill_(0.5)
    (params[touched[0]].float().square().sum()).backward()
    finalize_grads([model], mesh, ddps=[ddp])
    assert torch.equal(by_hand.main_grad, torch.full_like(by_hand, 0.5))
    assert torch.allclose(params[touched[0]].main_grad, 2 * params[touched[0]].detach(), rtol=1e-6, atol=0)
    assert params[touched[1]].main_grad.abs().sum() == 0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(fp16=True, bf16=True), "--fp16 and --bf16 exclude each other"),
    (dict(optimizer="lamb"), "--optimizer must be one of"),
    (dict(clip_grad=-1.0), "--clip-grad must be >= 0"),
])
def test_invalid_optimizer_configs(kwargs, needle):
    with pytest.raises(ValueError) as info:
        OptimizerConfig(**kwargs)
    assert needle in str(info.value)
    with pytest.raises(ValueError, match="--ddp-bucket-size must be > 0"):
        DDPConfig(bucket_size=0)


def _resume_body(split_at):
    """Train 5 steps, or `split_at` steps, save, rebuild everything, load, and train the rest."""
    mesh = ParallelMesh(ParallelConfig(world_size=dist.get_world_size()))
    cfg = make_config(**VARIANTS["mixtral"])

    def build():
        model = GPTModel(cfg, mesh, seed=SEED)
        ddp = DistributedDataParallel(model, mesh, DDPConfig(**DO, **OVERLAP))
        return model, ddp, MegatronOptimizer([ddp], mesh, OptimizerConfig(use_distributed_optimizer=True), SCHEDULE)

    model, ddp, opt = build()
    replica, per_replica = mesh.coordinates["dp"], MICRO_BATCHES // mesh.config.dp
    for step in range(STEPS):
        if step == split_at:
            saved_model = {n: p.detach().clone() for n, p in model.named_parameters()}
            saved_opt = opt.state_dict()
            model, ddp, opt = build()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(saved_model[n])
            opt.load_state_dict(saved_opt)
        forward_backward([model], [micro_batch(cfg, step, replica * per_replica + m) for m in range(per_replica)],
                         mesh, ddps=[ddp])
        finalize_grads([model], mesh, ddps=[ddp])
        opt.step()
        opt.zero_grad([ddp])
    return {n: p.detach() for n, p in model.named_parameters()}, sorted(opt.state_dict()["params"])


def test_optimizer_state_round_trip_resumes_bitwise(dist_run):
    unbroken = dist_run(2, _resume_body, None)
    resumed = dist_run(2, _resume_body, 2)
    for (a, names), (b, _) in zip(unbroken, resumed):
        assert "decoder.layers.0.self_attention.linear_qkv.weight" in names  # keyed by global name
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("world, parallel, kwargs", [(2, dict(), VARIANTS["gpt"]),
                                                     (4, dict(ep=2), MOE)])
def test_overlapped_param_gather_changes_nothing(dist_run, world, parallel, kwargs):
    plain = dist_run(world, _body, kwargs, parallel, dict(**DO, bucket_size=2000), 0.5)
    overlapped = dist_run(world, _body, kwargs, parallel, dict(**DO, **OVERLAP, overlap_param_gather=True), 0.5)
    for a, b in zip(plain, overlapped):
        assert a["norms"] == b["norms"]
        for name, (piece, _) in a["params"].items():
            assert torch.equal(piece, b["params"][name][0]), name


def _gather_in_flight_body():
    mesh = ParallelMesh(ParallelConfig(world_size=dist.get_world_size(), ep=2))
    cfg = make_config(**MOE)
    model = GPTModel(cfg, mesh, seed=SEED)
    ddp = DistributedDataParallel(model, mesh, DDPConfig(**DO, **OVERLAP, overlap_param_gather=True))
    opt = MegatronOptimizer([ddp], mesh, OptimizerConfig(use_distributed_optimizer=True), SCHEDULE)
    batch = micro_batch(cfg, 0, mesh.coordinates["dp"])
    forward_backward([model], [batch], mesh, ddps=[ddp])
    finalize_grads([model], mesh, ddps=[ddp])
    opt.step()
    buckets = [b for buffer in ddp.buffers for b in buffer.buckets]
    in_flight = sum(b.param_gather is not None for b in buckets)
    model(batch["tokens"])  # the pre-hooks wait for every bucket the forward touches
    return in_flight, len(buckets), sum(b.param_gather is not None for b in buckets)


def test_param_gathers_run_until_the_forward_needs_them(dist_run):
    for in_flight, buckets, left in dist_run(4, _gather_in_flight_body):
        assert in_flight == buckets > 1 and left == 0


def _expert_bias_through_finalize():
    mesh = ParallelMesh(ParallelConfig(world_size=dist.get_world_size(), ep=2))
    kwargs = dict(VARIANTS["mixtral"], moe=MoEConfig(num_experts=4, router_score_function="sigmoid",
                                                     router_enable_expert_bias=True, router_bias_update_rate=0.1))
    cfg = make_config(**kwargs)
    model = GPTModel(cfg, mesh, seed=SEED)
    ddp = DistributedDataParallel(model, mesh, DDPConfig(**DO))
    forward_backward([model], [micro_batch(cfg, 0, mesh.coordinates["dp"])], mesh, ddps=[ddp])
    finalize_grads([model], mesh, ddps=[ddp])
    router = model.decoder.layers["0"].mlp.router
    return router.expert_bias.tolist(), router.routed_counts.sum().item()


def test_finalize_updates_expert_biases_once_per_step(dist_run):
    results = dist_run(2, _expert_bias_through_finalize)
    biases = [bias for bias, _ in results]
    assert biases[0] == biases[1] and any(b != 0 for b in biases[0])  # same on every rank, and moved
    assert all(left == 0 for _, left in results)                       # counts consumed
