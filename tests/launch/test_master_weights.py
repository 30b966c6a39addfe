"""``optim.master_weights``: bf16 expert weights on the model, fp32 masters in the optimizer.

On the CPU under ``train.precision=bf16`` the expert backend computes in bf16 (CPU autocast casts the fp32 weights
of today's path to bf16, nearest even; the master path's weights already are), so the whole step runs here and is
compared with today's on the same inputs: with ``train.grad_accum=1`` the bf16 gradient holds exactly what today's
fp32 gradient holds, and the updated masters equal today's updated weights.
"""

from __future__ import annotations

import re

import pytest
import torch

from launch.kernel_adamw import KernelAdamW
from moe.errors import ConfigError

TINY = ["model.num_layers=2", "model.d_model=64", "model.d_ff=64", "model.dense_d_ff=128", "model.num_experts=4",
        "train.batch_size=4", "train.seq_len=32", "train.precision=bf16", "experts.backend=torch"]


def _engine(*overrides: str, seed: int = 0, ckpt: str = "unused"):  # type: ignore[no-untyped-def]
    """A native engine over the tiny model on the CPU, as ``launch.train`` builds it (same seed, same weights);
    checkpoints go to ``ckpt``."""
    import dataclasses

    from launch.engines import build_engine
    from launch.job import manifest_of
    from moe.model import MoETransformer
    from parallel import Runtime
    from tools.bench.step_budget import compose_job

    job = compose_job([*TINY, *overrides])
    job = dataclasses.replace(job, checkpoint=dataclasses.replace(job.checkpoint, dir=ckpt))
    torch.manual_seed(seed)
    core = MoETransformer(job.model, job.router, job.experts)
    core.prepare(torch.device("cpu"))
    return job, core, build_engine(job, core, Runtime(device=torch.device("cpu"), cfg=job.parallel, replicated=True), manifest_of(job))


def _backward(job, engine, x, y) -> None:  # type: ignore[no-untyped-def]
    """The trainer's forward and backward (``launch.train_step.forward_backward``) under CPU bf16 autocast."""
    from launch.train import autocast_for
    from launch.train_step import forward_backward
    from parallel import Runtime

    engine.zero_grad()
    forward_backward(engine, Runtime(device=torch.device("cpu"), cfg=job.parallel, replicated=True), x, y, 0, job,
                     autocast_for("bf16", torch.device("cpu")))


def _step(job, engine, x, y) -> None:  # type: ignore[no-untyped-def]
    _backward(job, engine, x, y)
    engine.grad_norm()
    engine.step(torch.tensor(True))


def _batch(job, seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, job.model.vocab_size, (job.train.batch_size, job.train.seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("moments", ["bf16", "fp32"])
@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_one_step_masters_equal_todays_fp32_weights(moments, clip) -> None:
    """Same weights and batch, one step each way: bf16 gradients equal today's fp32 ones exactly, the masters after the
    step equal today's weights (exactly without clipping and with bf16 moments, where both run the same kernel; within
    fp32 rounding where the clipping divisor comes from a norm summed in another order, or torch's AdamW steps today's
    fp32 moments), and the bf16 weights are the masters rounded."""
    seed = int(torch.randint(0, 1000, (1,)))
    common = [f"optim.moments_dtype={moments}", f"optim.grad_clip={clip}", "optim.warmup_steps=0", "optim.lr=1e-2"]
    job_a, core_a, today = _engine(*common, seed=seed)
    job_b, core_b, master = _engine(*common, "optim.master_weights=true", seed=seed)
    experts_a, experts_b = core_a.expert_weights(), core_b.expert_weights()
    assert {p.dtype for p in experts_a} == {torch.float32} and {p.dtype for p in experts_b} == {torch.bfloat16}
    assert isinstance(master.optimizer, KernelAdamW)
    for a, b in zip(experts_a, experts_b):
        assert torch.equal(master.optimizer.masters[b], a) and torch.equal(b, a.to(torch.bfloat16))
    x, y = _batch(job_a, seed)
    initial = [a.detach().clone() for a in experts_a]
    _backward(job_a, today, x, y)
    _backward(job_b, master, x, y)
    for a, b in zip(experts_a, experts_b):
        assert b.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32
        assert torch.equal(b.grad.float(), a.grad)  # the wgrad's bf16 values, held without loss in today's fp32
    norm_a, norm_b = today.grad_norm(), master.grad_norm()
    torch.testing.assert_close(norm_b, norm_a, rtol=1e-6, atol=0)
    assert clip == 0.0 or float(norm_a) > clip  # the clipping is active where asked for
    ok = torch.tensor(True)
    today.step(ok)
    master.step(ok)
    exact = clip == 0.0 and moments == "bf16"
    for a, b in zip(experts_a, experts_b):
        new = master.optimizer.masters[b]
        if exact:
            assert torch.equal(new, a)
        else:
            torch.testing.assert_close(new, a, rtol=1e-6, atol=1e-7)
        assert torch.equal(b, new.to(torch.bfloat16))
    for (name, a), b in zip(core_a.named_parameters(), core_b.parameters()):
        if b.dtype == torch.float32:  # everything but the experts: fp32 on both sides
            if exact:
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert max(float((master.optimizer.masters[b] - a0).abs().max()) for b, a0 in zip(experts_b, initial)) > 1e-4  # it moved


def test_a_nan_step_changes_no_master_no_weight_no_moment() -> None:
    job, core, engine = _engine("optim.master_weights=true", "optim.moments_dtype=bf16")
    x, y = _batch(job, 1)
    _step(job, engine, x, y)  # moments and step counts away from zero
    _backward(job, engine, x, y)
    core.expert_weights()[0].grad[0, 0, 0] = float("nan")
    opt = engine.optimizer
    before = ([p.detach().clone() for p in core.parameters()] + [m.clone() for m in opt.masters.values()]
              + [t.clone() for st in opt.state.values() for t in st.values()])
    engine.grad_norm()
    engine.step(torch.tensor(False))
    after = list(core.parameters()) + list(opt.masters.values()) + [t for st in opt.state.values() for t in st.values()]
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=2", r"^train\.grad_accum \(2\) must be 1 with optim\.master_weights=true \(the expert gradients are bf16"),
    ("train.precision=fp32", r"^train\.precision \('fp32'\) must be bf16 \(or auto on a GPU\) with optim\.master_weights=true"),
    ("parallel=ddp", r"^parallel\.mode \('ddp'\) must be none with optim\.master_weights=true \(other layouts are not supported yet\)$"),
    ("engine=deepspeed", r"^optim\.master_weights \(True\) must be false with engine\.name=deepspeed"),
])
def test_what_master_weights_refuses_before_anything_is_built(override, message) -> None:
    from tools.bench.step_budget import compose_job

    with pytest.raises(Exception) as err:
        compose_job([*TINY, "optim.master_weights=true", override])
    cause = err.value
    while not isinstance(cause, ConfigError) and cause.__cause__ is not None:  # Hydra may wrap it
        cause = cause.__cause__
    assert isinstance(cause, ConfigError)
    assert len(str(cause).splitlines()) == 1
    assert re.search(message, str(cause)), str(cause)


def test_precision_that_resolves_to_fp32_is_refused_at_start_up() -> None:
    from launch.train import check_runtime
    from parallel import Runtime
    from tools.bench.step_budget import compose_job

    job = compose_job([*TINY[:-2], "experts.backend=torch", "optim.master_weights=true"])  # train.precision=auto
    with pytest.raises(ConfigError, match=r"^optim\.master_weights \(True\) needs bf16: train\.precision=auto resolves to fp32 on cpu"):
        check_runtime(job, Runtime(device=torch.device("cpu"), cfg=job.parallel, replicated=True))


def test_norm_of_mixed_dtype_gradients_is_the_norm_of_their_fp32_values() -> None:
    from parallel.runtime import mixed_grad_norm

    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, (1,))))
    grads = [torch.randn(300, generator=gen).to(torch.bfloat16), torch.randn(7, 5, generator=gen), torch.randn(40, generator=gen).bfloat16()]
    want = torch.cat([g.double().flatten() for g in grads]).norm()
    got = mixed_grad_norm(grads)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)
    # torch's own total norm rounds the bf16 group's norm to bf16 first: the reason for mixed_grad_norm
    assert abs(float(torch.nn.utils.get_total_norm(grads)) - float(want)) > 1e-5 * float(want)


def test_checkpoints_hold_the_masters_and_resume_across_the_setting(tmp_path) -> None:
    """master_weights=true saves fp32 masters under the usual expert keys (no second copy); a run without master
    weights loads them as its fp32 weights, and a master run loads a plain run's fp32 weights into its masters."""
    from torch.distributed.checkpoint import FileSystemReader

    x_y = None
    paths = {}
    engines = {}
    for mw in ("true", "false"):
        job, core, engine = _engine(f"optim.master_weights={mw}", "optim.moments_dtype=bf16", ckpt=str(tmp_path / mw),
                                    seed=3 if mw == "true" else 4)
        x_y = x_y or _batch(job, 2)
        _step(job, engine, *x_y)
        writer = engine.checkpoint_writer()
        paths[mw] = engine.save(writer, 1, {"step": 1})
        engines[mw] = (core, engine)
    meta = FileSystemReader(str(paths["true"])).read_metadata().state_dict_metadata
    expert = {k: v.properties.dtype for k, v in meta.items() if k.startswith("model.") and "experts.w_" in k}
    assert expert and set(expert.values()) == {torch.float32}
    assert not any("master" in k for k in meta)
    sizes = {mw: sum(v.size.numel() for v in FileSystemReader(str(p)).read_metadata().state_dict_metadata.values()
                     if hasattr(v, "size")) for mw, p in paths.items()}
    assert sizes["true"] == sizes["false"]  # the same tensors, nothing stored twice
    for src, dst in (("true", "false"), ("false", "true")):
        core_s, engine_s = engines[src]
        _, core_d, engine_d = _engine(f"optim.master_weights={dst}", "optim.moments_dtype=bf16", seed=9, ckpt=str(tmp_path / "unused"))
        engine_d.load(paths[src])
        saved = [engine_s.optimizer.masters[p] if src == "true" else p for p in core_s.expert_weights()]
        for w, p in zip(saved, core_d.expert_weights()):
            if dst == "true":
                assert torch.equal(engine_d.optimizer.masters[p], w) and torch.equal(p, w.to(torch.bfloat16))
            else:
                assert torch.equal(p, w)
        for p_s, p_d in zip(core_s.expert_weights(), core_d.expert_weights()):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(engine_s.optimizer.state[p_s][key], engine_d.optimizer.state[p_d][key])


def test_the_budget_counts_the_master_kernel_bytes() -> None:
    """On ``meta`` (the budget's GPU): the expert weights' group is one ``adamw_master_`` launch reading master 4 + grad
    2 + m, v 2 each and writing master 4 + m, v 2 each + the bf16 weight 2 (20 B per parameter), plus a 4-byte step
    count per tensor and grad_scale and found_inf; with fp32 moments 28 B per parameter."""
    from launch.masked_update import masked_step
    from moe.model import MoETransformer
    from tools.bench.op_counter import OpCounter
    from tools.bench.step_budget import compose_job

    job = compose_job([*TINY, "optim.master_weights=true"])
    E, D, F = job.model.num_experts, job.model.d_model, job.model.d_ff
    n = 2 * 3 * E * D * F  # two MoE layers' three stacked weights
    for moments, per in ((torch.bfloat16, 20), (torch.float32, 28)):
        with torch.device("meta"):
            core = MoETransformer(job.model, job.router, job.experts)
            experts = core.expert_weights()
            opt = KernelAdamW([{"params": experts, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, moments_dtype=moments,
                              masters=experts)
            for p in experts:
                p.grad = torch.empty_like(p)
            ok, scale = torch.empty((), dtype=torch.bool), torch.empty(())
        assert {p.dtype for p in experts} == {torch.bfloat16} and {m.dtype for m in opt.masters.values()} == {torch.float32}
        with OpCounter() as counter:
            masked_step(opt, ok, scale)
        ops = [r for r in counter.budget.ops if r.name == "moeforge.adamw_master_.default"]
        assert [r.bytes for r in ops] == [per * n + 6 * 4 + 8]
        assert [r.launches for r in ops] == [1]


def test_the_step_budget_has_no_expert_weight_casts() -> None:
    """The counted step (``tools.bench.step_budget`` on an H200 stand-in, grouped_mm): today the MoE layers cast the three
    stacked weights to bf16 in one ``cast_many`` per layer forward and their gradients back in one per layer backward,
    each 3 E D F x (4 + 2) bytes; with master weights no MoE op moves that many bytes as a cast, and the grad clip reads
    the bf16 expert gradients (2 B each) where it read fp32 ones."""
    from tools.bench.step_budget import count_step

    small = ["model.num_layers=2", "model.d_model=256", "model.d_ff=256", "model.dense_d_ff=512", "model.num_experts=8",
             "train.batch_size=2", "train.seq_len=64", "optim.moments_dtype=bf16"]
    E, D, F = 8, 256, 256
    cast = 3 * E * D * F * 6
    counted = {mw: count_step([*small, f"optim.master_weights={mw}"], "h200") for mw in ("false", "true")}

    def casts(c):  # type: ignore[no-untyped-def]
        return [r.bytes for r, comp in zip(c.budget.ops, c.components) if comp == "MoE layers" and r.kind == "glue"
                and r.name.split(".")[1] in ("_to_copy", "cast_many") and r.bytes >= cast]

    assert casts(counted["false"]) == [cast] * 4  # two layers, forward and backward: the hand count
    assert casts(counted["true"]) == []

    def clip_reads(c):  # type: ignore[no-untyped-def]
        return sum(r.bytes for r, comp in zip(c.budget.ops, c.components) if comp == "grad clip" and r.kind == "glue")

    assert clip_reads(counted["false"]) - clip_reads(counted["true"]) == 2 * 3 * E * D * F * 2  # 4 - 2 bytes per expert weight


@pytest.mark.slow
def test_a_master_weights_run_resumes_bit_for_bit(tmp_path) -> None:
    """Interrupted after its step-4 checkpoint and resumed (masters loaded, bf16 weights re-derived) vs uninterrupted."""
    from tests.launch.test_train import RESUME, SMALL, straight_and_resumed

    a, b = straight_and_resumed(tmp_path, [*SMALL, *RESUME, "train.precision=bf16", "optim.master_weights=true", "optim.moments_dtype=bf16"])
    assert sorted(b) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert b[step]["loss"] == a[step]["loss"], step
    assert b[8]["val_loss"] == a[8]["val_loss"]


def test_load_state_dict_keeps_fp32_moments_of_bf16_weights() -> None:
    """torch's ``Optimizer.load_state_dict`` casts state to the parameter's dtype, which would round fp32 moments of a
    bf16 weight to bf16; ``KernelAdamW`` takes them from the saved tensors."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, (1,))))

    def build() -> tuple[torch.nn.Parameter, KernelAdamW]:
        w = torch.nn.Parameter(torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0)))
        return w, KernelAdamW([{"params": [w]}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, moments_dtype=torch.float32, masters=[w])

    w, opt = build()
    w.grad = torch.randn(w.shape, generator=gen).to(torch.bfloat16)
    opt.step()
    v, other = build()
    other.load_state_dict(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        assert other.state[v][key].dtype == torch.float32
        assert torch.equal(other.state[v][key], opt.state[w][key])
        assert not torch.equal(opt.state[w][key], opt.state[w][key].bfloat16().float())  # bf16 rounding would show
