"""Every expert layout trains the same MoE model: ep, etp, tp with SP, both dispatchers, dropless and capacity
(both drop policies, padded or not), on 2 to 8 gloo ranks, against one process running the same micro-batches.

Routing decisions (tokens per expert, drops) must be identical, and logits, per-token loss (aux and z losses
included through their gradients) and every parameter's gradient equal to 1e-5.
"""

import itertools

import pytest
import torch

from megamoe.moe.config import MoEConfig
from tests.model_cases import VARIANTS, check_against_single_process, run_model


def moe_model(**moe):
    base = dict(num_experts=4, router_topk=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    return dict(VARIANTS["mixtral"], moe=MoEConfig(**{**base, **moe}))


def _body(model_kwargs, parallel):
    return run_model(model_kwargs, parallel=parallel)


SP = dict(sequence_parallel=True)
DROP = dict(expert_capacity_factor=1.0)
CASES = {
    "ep2-alltoall": (2, dict(ep=2), dict(token_dispatcher_type="alltoall")),
    "ep2-allgather-seqaux": (2, dict(ep=2), dict(load_balancing_type=("aux_loss", "seq_aux_loss"),
                                                  aux_loss_coeff=(0.01, 0.02))),
    "tp2sp-ep2-alltoall": (2, dict(tp=2, ep=2, etp=1, **SP), dict(token_dispatcher_type="alltoall")),
    "tp2sp-etp2-allgather": (2, dict(tp=2, ep=1, etp=2, **SP), dict()),
    "tp2sp-ep2-alltoall-grouped-mm": (4, dict(tp=2, ep=2, etp=1, **SP), dict(token_dispatcher_type="alltoall",
                                                                          grouped_gemm=True)),
    "tp2sp-ep2-alltoall-probs": (4, dict(tp=2, ep=2, etp=1, **SP), dict(token_dispatcher_type="alltoall", **DROP)),
    "tp2sp-ep2-etp2-alltoall-position-pad": (4, dict(tp=2, ep=2, etp=2, **SP), dict(
        token_dispatcher_type="alltoall", token_drop_policy="position", pad_expert_input_to_capacity=True, **DROP)),
    "ep4-allgather-shared-sigmoid": (4, dict(ep=4), dict(shared_expert_intermediate_size=32, shared_expert_gate=True,
                                                         router_score_function="sigmoid")),
    "tp2sp-ep4-alltoall-groups": (8, dict(tp=2, ep=4, etp=1, **SP), dict(
        token_dispatcher_type="alltoall", router_num_groups=2, router_group_topk=1)),
    "tp2sp-ep2-etp2-allgather-probs-pad": (8, dict(tp=2, ep=2, etp=2, **SP), dict(
        pad_expert_input_to_capacity=True, layer_freq=(0, 1), **DROP)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_layout_equals_single_process(dist_run, case):
    world, parallel, moe = CASES[case]
    kwargs = moe_model(**moe)
    check_against_single_process(kwargs, dist_run(world, _body, kwargs, parallel))


def _padded_rows_body(model_kwargs, parallel):
    # The experts' zero-row padding (what bf16 on CPU does, experts.row_multiple) forced on in fp32, so the ranks
    # pad while the single-process reference does not, and the comparison keeps its 1e-5.
    from megamoe.moe import experts

    original = experts.row_multiple
    experts.row_multiple = lambda device, dtype: experts.ONEDNN_ROW_MULTIPLE
    try:
        return run_model(model_kwargs, parallel=parallel)
    finally:
        experts.row_multiple = original


@pytest.mark.parametrize("case", ["ep2-alltoall", "tp2sp-etp2-allgather", "tp2sp-ep2-alltoall-grouped-mm"])
def test_padded_expert_rows_equal_single_process(dist_run, case):
    world, parallel, moe = CASES[case]
    kwargs = moe_model(**moe)
    check_against_single_process(kwargs, dist_run(world, _padded_rows_body, kwargs, parallel))


CAPACITY_MODES = {"dropless": {}, "probs": DROP, "position": dict(token_drop_policy="position", **DROP),
                  "probs-pad": dict(pad_expert_input_to_capacity=True, **DROP),
                  "position-pad": dict(token_drop_policy="position", pad_expert_input_to_capacity=True, **DROP)}
FULL = [(ep, etp, tp, dispatcher, mode) for ep, etp, tp, dispatcher, mode in itertools.product(
    (1, 2, 4), (1, 2), (1, 2), ("allgather", "alltoall"), sorted(CAPACITY_MODES))]


@pytest.mark.full
@pytest.mark.parametrize("ep, etp, tp, dispatcher, mode", FULL)
def test_moe_layout_matrix(dist_run, ep, etp, tp, dispatcher, mode):
    world = 4 if ep * etp <= 4 else 8
    parallel = dict(tp=tp, ep=ep, etp=etp, sequence_parallel=tp > 1)
    kwargs = moe_model(token_dispatcher_type=dispatcher, **CAPACITY_MODES[mode])
    check_against_single_process(kwargs, dist_run(world, _body, kwargs, parallel))


def _train_body(model_kwargs, parallel):
    return run_model(model_kwargs, parallel=parallel, training=True)


TP2_EP2 = dict(tp=2, ep=2, etp=1, **SP)
TRAINING_CASES = {
    # random draws (jitter, Gumbel second expert, random second expert) are hashes of global token identity
    "jitter-sampling-alltoall": dict(input_jitter_eps=0.1, second_expert_policy="sampling",
                                     token_dispatcher_type="alltoall"),
    "random-second-expert-capacity": dict(second_expert_policy="random", **DROP),
    "sinkhorn-top1": dict(load_balancing_type="sinkhorn", router_topk=1, aux_loss_coeff=0.0),
    "expert-choice": dict(router_type="expert_choice", router_topk=1, aux_loss_coeff=0.0,
                          token_dispatcher_type="alltoall"),
    "expert-bias-sigmoid": dict(router_score_function="sigmoid", router_enable_expert_bias=True),
}


@pytest.mark.filterwarnings("ignore:--moe-router-type expert_choice")
@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_moe_training_routing_is_layout_invariant(dist_run, case):
    kwargs = moe_model(**TRAINING_CASES[case])
    check_against_single_process(kwargs, dist_run(4, _train_body, kwargs, TP2_EP2), training=True)


def _bias_and_metrics(model_kwargs, parallel, micro_batches=None):
    import torch
    import torch.distributed as dist

    from megamoe.model.gpt import GPTModel
    from megamoe.moe.layer import end_of_step, moe_layers
    from megamoe.moe.metrics import reduce_metrics
    from megamoe.parallel.config import ParallelConfig
    from megamoe.parallel.mesh import ParallelMesh
    from tests.model_cases import SEED, batch, make_config

    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = ParallelMesh(ParallelConfig(world_size=world, **parallel))
    cfg = make_config(**model_kwargs)
    model = GPTModel(cfg, mesh, seed=SEED).train()
    per_layer = {}
    for mb in micro_batches if micro_batches is not None else [mesh.coordinates["dp"]]:
        ids, labels = batch(cfg, micro_batch=mb)
        model(ids, labels=labels, sample_ids=torch.arange(2) + 2 * mb).mean().backward()
        for layer in moe_layers(model):  # what the single process sees, summed like the dp reduction sums
            seen = per_layer.setdefault(layer.layer_number, {})
            for k, v in layer.metrics.items():
                seen[k] = v if k not in seen else seen[k] + v
    reduced = reduce_metrics(per_layer, mesh["dp_cp"])
    end_of_step(model, mesh)
    return reduced, {layer.layer_number: layer.router.expert_bias.tolist() for layer in moe_layers(model)}


def test_expert_bias_update_and_metrics_reduce_over_data_parallel(dist_run):
    kwargs = moe_model(router_score_function="sigmoid", router_enable_expert_bias=True, router_bias_update_rate=0.5)
    results = dist_run(4, _bias_and_metrics, kwargs, TP2_EP2)
    # One process, both micro-batches in one step: counts add up, then one bias update.
    ref_metrics, ref_bias = _bias_and_metrics(kwargs, {}, micro_batches=[0, 1])
    for metrics, bias in results:
        assert bias == ref_bias
        for layer, ref in ref_metrics.items():
            assert metrics[layer]["tokens_per_expert"] == ref["tokens_per_expert"]
            # averaged over the two replicas = the single process's sum over two micro-batches, halved
            assert metrics[layer]["entropy"] == pytest.approx(ref["entropy"] / 2, rel=1e-6)
    assert any(b != 0 for biases in ref_bias.values() for b in biases)


def test_global_aux_loss_is_invariant_to_tp_ep_etp_and_dispatcher(dist_run):
    # Layout-dependent in dp x gradient accumulation only: compare layouts that all have two dp replicas.
    kwargs = moe_model(load_balancing_type=("global_aux_loss",), aux_loss_coeff=0.5)
    plain = dist_run(2, _train_body, kwargs, dict())
    layouts = [dist_run(4, _train_body, moe_model(load_balancing_type=("global_aux_loss",), aux_loss_coeff=0.5,
                                                  token_dispatcher_type="alltoall"), TP2_EP2),
               dist_run(4, _train_body, kwargs, dict(tp=2, ep=1, etp=2, **SP))]
    router_grads = [n for n in plain[0]["grads"] if n.endswith("router.weight")]
    for layout in layouts:
        for r in layout:
            reference = plain[r["coords"]["dp"]]
            assert torch.allclose(r["loss"], reference["loss"], rtol=1e-5)
        # the router's gradient (where the loss acts), summed over ranks as the dp reduction will sum it
        for name in router_grads:
            want = sum(p["grads"][name] for p in plain)
            got = sum(r["grads"][name] for r in layout)
            assert ((got - want).norm() / want.norm()).item() < 1e-5, name


def test_recomputation_under_tp_sp_ep_equals_single_process(dist_run):
    """Full recomputation reruns the layers' collectives (SP gathers, routing gather, all-to-all) in backward."""
    kwargs = dict(moe_model(token_dispatcher_type="alltoall"), hidden_dropout=0.1, attention_dropout=0.1,
                  recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    check_against_single_process(kwargs, dist_run(4, _train_body, kwargs, TP2_EP2), training=True)
