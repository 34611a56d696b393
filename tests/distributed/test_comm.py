"""comm.py and regions.py on gloo ranks: forward and backward against single-process math, and the ledger.

Every rank draws the same full tensors from one seed, so each can compute the single-process answer itself and
compare it with what the collective produced.
"""

import torch

from megamoe.parallel import comm, regions
from megamoe.parallel.group import AxisGroup
from megamoe.parallel.ledger import LedgerEntry

torch.set_default_dtype(torch.float32)


def _full(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _per_rank(n, *shape, seed):
    return [_full(*shape, seed=seed + 1000 * r) for r in range(n)]


def _regions_body():
    group = AxisGroup.world()
    n, r = group.size, group.index
    report = {}

    def close(name, got, want):
        report[name] = torch.allclose(got, want, rtol=1e-6, atol=1e-6)

    # copy_to: identity forward, backward sums every rank's gradient.
    x = _full(4, 3, seed=1).requires_grad_()
    w = _per_rank(n, 4, 3, seed=2)
    y = regions.copy_to_tp_region(x, group)
    (y * w[r]).sum().backward()
    close("copy_fwd", y, x)
    close("copy_bwd", x.grad, sum(w))

    # reduce_from: forward sums, backward passes through.
    xs = _per_rank(n, 4, 3, seed=3)
    x = xs[r].clone().requires_grad_()
    w = _full(4, 3, seed=4)
    y = regions.reduce_from_tp_region(x, group)
    (y * w).sum().backward()
    close("reduce_fwd", y, sum(xs))
    close("reduce_bwd", x.grad, w)

    # scatter/gather along the last dim (tensor parallel) and dim 0 (sequence parallel).
    full, w = _full(4, 2 * n, seed=5), _full(4, 2 * n, seed=6)
    for name, scatter, gather, dim in (("tp", regions.scatter_to_tp_region, regions.gather_from_tp_region, 1),
                                       ("sp", regions.scatter_to_sp_region, None, 0)):
        full_d, w_d = (full, w) if dim == 1 else (full.t().contiguous(), w.t().contiguous())
        mine = slice(r * 2, (r + 1) * 2)
        take = (lambda t: t[:, mine]) if dim == 1 else (lambda t: t[mine])
        x = full_d.clone().requires_grad_()
        y = scatter(x, group)
        (y * take(w_d)).sum().backward()
        close(f"scatter_{name}_fwd", y, take(full_d))
        # each rank's loss touches only its slice; the all-gathered gradient is the whole of w
        close(f"scatter_{name}_bwd", x.grad, w_d)
        if gather is not None:
            x = take(full_d).clone().requires_grad_()
            y = gather(x, group)
            (y * w_d).sum().backward()
            close(f"gather_{name}_fwd", y, full_d)
            close(f"gather_{name}_bwd", x.grad, take(w_d))

    # gather_from_sp: each rank's loss has its own weights; the reduce-scattered gradient is their sum's slice.
    full = _full(2 * n, 3, seed=7)
    ws = _per_rank(n, 2 * n, 3, seed=8)
    mine = slice(r * 2, (r + 1) * 2)
    for grad_rs in (True, False):
        x = full[mine].clone().requires_grad_()
        y = regions.gather_from_sp_region(x, group, grad_reduce_scatter=grad_rs)
        (y * ws[r]).sum().backward()
        close(f"gather_sp_fwd_{grad_rs}", y, full)
        close(f"gather_sp_bwd_{grad_rs}", x.grad, (sum(ws) if grad_rs else ws[r])[mine])

    # reduce_scatter_to_sp: forward sums and keeps my slice; backward all-gathers.
    xs = _per_rank(n, 2 * n, 3, seed=9)
    w = _full(2 * n, 3, seed=10)
    x = xs[r].clone().requires_grad_()
    y = regions.reduce_scatter_to_sp_region(x, group)
    (y * w[mine]).sum().backward()
    close("reduce_scatter_fwd", y, sum(xs)[mine])
    close("reduce_scatter_bwd", x.grad, w)

    # all_to_all with uneven splits: rank s sends rows_(s->d) = (s + d) % 3 + 1 rows to d; each row encodes
    # (src, dst, row). The loss weight of a received row is 2 * value + 1, so the gradient that comes back to
    # each sent row must be 2 * (its value) + 1.
    def rows(s, d):
        return (s + d) % 3 + 1

    send = torch.cat([torch.tensor([[100.0 * r + 10 * d + k] for k in range(rows(r, d))]) for d in range(n)])
    send.requires_grad_()
    out = regions.all_to_all(send, group, output_splits=[rows(s, r) for s in range(n)],
                             input_splits=[rows(r, d) for d in range(n)])
    want = torch.cat([torch.tensor([[100.0 * s + 10 * r + k] for k in range(rows(s, r))]) for s in range(n)])
    (out * (2 * out.detach() + 1)).sum().backward()
    close("all_to_all_fwd", out, want)
    close("all_to_all_bwd", send.grad, 2 * send.detach() + 1)
    return report


def test_regions_forward_and_backward_match_single_process(dist_run):
    for world in (2, 4):
        for rank, report in enumerate(dist_run(world, _regions_body)):
            failed = [name for name, ok in report.items() if not ok]
            assert not failed, f"world {world} rank {rank}: {failed}"
            assert len(report) == 18


def _raw_ops_body():
    group = AxisGroup.world()
    n, r = group.size, group.index
    # all_gather / reduce_scatter into flat buffers (what the distributed optimizer uses)
    shard = torch.arange(3.0) + 10 * r
    gathered = torch.empty(3 * n)
    comm.all_gather_into_tensor(gathered, shard, group)
    full = torch.arange(2.0 * n) * (r + 1)
    mine = torch.empty(2)
    pending = comm.reduce_scatter_tensor(mine, full, group, async_op=True)
    pending.wait()
    # broadcast from member 1
    b = torch.full((2,), float(r))
    comm.broadcast(b, group, src_index=1)
    # p2p ring: send to the next member, receive from the previous one
    buf = torch.empty(2)
    comm.send_recv(group, sends=[(torch.full((2,), float(r)), (r + 1) % n)], recvs=[(buf, (r - 1) % n)])
    return gathered.tolist(), mine.tolist(), b.tolist(), buf.tolist()


def test_raw_collectives(dist_run):
    n = 4
    scale = sum(range(1, n + 1))
    for r, (gathered, mine, b, buf) in enumerate(dist_run(n, _raw_ops_body)):
        assert gathered == [float(i + 10 * s) for s in range(n) for i in range(3)]
        assert mine == [float(2 * r) * scale, float(2 * r + 1) * scale]
        assert b == [1.0, 1.0]
        assert buf == [float((r - 1) % n)] * 2


def _ledger_body():
    from megamoe.parallel.config import ParallelConfig
    from megamoe.parallel.mesh import ParallelMesh

    mesh = ParallelMesh(ParallelConfig(world_size=4, tp=2))  # tp groups of 2, dp groups of 2, cp of 1
    r = mesh.rank
    with mesh.ledger.recording():
        for _ in range(3):
            comm.all_reduce(torch.zeros(10), mesh["tp"])                          # 40 B each
        comm.all_gather_into_tensor(torch.empty(12), torch.zeros(6), mesh["dp"])  # 24 B shard
        comm.reduce_scatter_tensor(torch.empty(2), torch.zeros(8), mesh.world)    # 32 B in, n = 4
        comm.all_to_all_single(torch.empty(4, 2), torch.zeros(4, 2), mesh["tp"])  # 32 B, keeps 16
        comm.broadcast(torch.zeros(5, dtype=torch.float64), mesh["dp"], src_index=0)
        comm.all_reduce(torch.zeros(7), mesh["cp"])                               # size 1: not recorded
        peer = r ^ 2  # the other member of my dp group
        comm.send_recv(mesh["dp"], sends=[(torch.zeros(3), mesh["dp"].ranks.index(peer))],
                       recvs=[(torch.empty(3), mesh["dp"].ranks.index(peer))])
    comm.all_reduce(torch.zeros(10), mesh["tp"])  # recording is off again
    return mesh["dp"].index, mesh.ledger.entries(), mesh.ledger.total(axis="tp")


def test_ledger_matches_closed_form(dist_run):
    for rank, (dp_index, entries, tp_total) in enumerate(dist_run(4, _ledger_body)):
        # Closed forms from ledger.py's docstring with n the group size and S the payload.
        expected = {
            ("tp", "all_reduce"): LedgerEntry(3, 3 * 40, 3 * (2 * (2 - 1) * 40 // 2)),
            ("dp", "all_gather"): LedgerEntry(1, 24, (2 - 1) * 24),
            ("world", "reduce_scatter"): LedgerEntry(1, 32, (4 - 1) * 32 // 4),
            ("tp", "all_to_all"): LedgerEntry(1, 32, 32 - 32 // 2),
            ("dp", "broadcast"): LedgerEntry(1, 40, 40 if dp_index == 0 else 0),
            ("dp", "send"): LedgerEntry(1, 12, 12),
            ("dp", "recv"): LedgerEntry(1, 12, 0),
        }
        assert entries == expected, f"rank {rank}"
        assert tp_total == LedgerEntry(3 + 1, 3 * 40 + 32, 3 * 40 + 16)  # all_reduce + all_to_all
