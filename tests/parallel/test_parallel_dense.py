"""GradAverager on 2 gloo ranks: overlapped buckets equal the after-backward path and the mean of
the ranks' gradients; missing gradients follow single-process semantics."""

from __future__ import annotations

import torch
from dist_harness import run_distributed

from parallel import ParallelConfig, setup_runtime
from parallel.dense import GradAverager


def _net(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _dense_worker() -> None:
    rt = setup_runtime(ParallelConfig(mode="ddp", timeout_s=60))
    r, W = rt.rank, rt.world_size
    group = rt.mesh.group("dp")
    x = torch.randn(2 * W, 8, generator=torch.Generator().manual_seed(1))
    mine = x[2 * r : 2 * r + 2]
    results = {}
    for overlap in (False, True):
        net = _net(0)
        unused = torch.nn.Parameter(torch.ones(3))  # no gradient on any rank
        only_rank0 = torch.nn.Parameter(torch.ones(2))  # a gradient on rank 0 only
        params = [unused, only_rank0, *net.parameters()]  # buckets run in reverse: these two last
        ga = GradAverager(params, group, bucket_mb=4 * 100 / 2**20, meter=None, overlap=overlap)  # ~100 floats per bucket
        assert len(ga.buckets) >= 3
        loss = net(mine).square().sum() + (only_rank0.sum() * 3.0 if r == 0 else 0.0)
        loss.backward()
        if overlap:  # the buckets of the net's gradients started during backward; the last (unused) one did not
            assert 1 <= len(ga._started) < len(ga.buckets), (len(ga._started), len(ga.buckets))
        else:
            assert not ga._started
        ga.sync(divide_by=W)
        results[overlap] = [None if p.grad is None else p.grad.clone() for p in params]
        assert unused.grad is None, "no rank had a gradient: it must stay None"
        torch.testing.assert_close(only_rank0.grad, torch.full((2,), 3.0 / W))
    for a, b in zip(results[False], results[True]):
        assert (a is None and b is None) or torch.equal(a, b)
    # Against one process on the whole batch with the per-rank mean of losses.
    ref = _net(0)
    (sum(ref(x[2 * s : 2 * s + 2]).square().sum() for s in range(W)) / W).backward()
    for p, g in zip(ref.parameters(), results[True][2:]):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    # A second backward before sync is refused (its bucket may already be reduced).
    net = _net(0)
    ga = GradAverager(list(net.parameters()), group, bucket_mb=25.0, meter=None, overlap=True)
    net(mine).sum().backward()
    try:
        net(mine).sum().backward()
    except RuntimeError as exc:
        assert "overlap_grad_reduce" in str(exc)
    else:
        raise AssertionError("a second backward before sync must raise")


def test_overlapped_buckets_equal_after_backward_and_single_process() -> None:
    run_distributed(_dense_worker, 2)


def _fsdp_bytes_worker() -> None:
    """The modeled comm/fsdp_* bytes of a training step equal what FSDP2 actually sends: count the
    bytes of its all-gather inputs and reduce-scatter outputs (its shards) through the
    torch.distributed entry points it calls."""
    from test_parallel_fssdp import lm_loss, tiny_model

    for cfg in (ParallelConfig(mode="fsdp", timeout_s=60), ParallelConfig(mode="ep", dense="fsdp", timeout_s=60)):
        _check_fsdp_bytes(cfg, lm_loss, tiny_model)


def _check_fsdp_bytes(cfg: ParallelConfig, lm_loss, tiny_model) -> None:
    import torch.distributed as dist

    from parallel import apply_parallel

    rt = setup_runtime(cfg)
    W = rt.world_size
    model = apply_parallel(tiny_model(), cfg, rt)
    shards = {"gather": 0, "scatter": 0}
    names = {"gather": ("all_gather_single", "all_gather_into_tensor"), "scatter": ("reduce_scatter_single", "reduce_scatter_tensor")}
    originals = {}
    for kind, candidates in names.items():
        for name in candidates:
            if hasattr(dist, name):
                original = getattr(dist, name)
                originals[name] = original

                def counting(*args, _kind=kind, _original=original, **kwargs):
                    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                    shard = min(tensors, key=lambda t: t.numel())  # the per-rank side of the collective
                    shards[_kind] += shard.numel() * shard.element_size()
                    return _original(*args, **kwargs)

                setattr(dist, name, counting)
    try:
        tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(rt.rank))
        rt.comm_metrics()
        lm_loss(model, tokens).backward()
        rt.before_optimizer_step(model)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    metrics = rt.comm_metrics()
    assert shards["gather"] > 0 and shards["scatter"] > 0, shards
    assert metrics["comm/fsdp_allgather_bytes_sent"] == (W - 1) * shards["gather"], (cfg.mode, metrics, shards)
    assert metrics["comm/fsdp_reducescatter_bytes_sent"] == (W - 1) * shards["scatter"], (cfg.mode, metrics, shards)


def test_fsdp_modeled_bytes_match_fsdp2_collectives() -> None:
    run_distributed(_fsdp_bytes_worker, 2)
