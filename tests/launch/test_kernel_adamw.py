"""``KernelAdamW`` (``optim.moments_dtype``): fp32 moments equal torch's AdamW, bf16 moments are its values rounded,
and a non-finite step changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from launch.config import JobConfig, OptimConfig, TrainConfig
from launch.kernel_adamw import KernelAdamW
from launch.masked_update import clip_scale, masked_step, takes_found_inf
from launch.optim import build_optimizer
from moe.errors import ConfigError


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))


def _groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """Decay on matrices, none on biases (``build_optimizer``'s split)."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def _set_grads(model: torch.nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def _pair(moments: torch.dtype, seed: int) -> tuple[torch.nn.Module, KernelAdamW, torch.nn.Module, torch.optim.AdamW]:
    a, b = _model(seed), _model(seed)
    ours = KernelAdamW(_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, moments_dtype=moments)
    theirs = torch.optim.AdamW(_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    return a, ours, b, theirs


def test_fp32_moments_equal_torch_adamw_over_steps_with_lr_changes() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    a, ours, b, theirs = _pair(torch.float32, int(torch.randint(0, 1000, (1,))))
    for lr in (1e-2, 3e-2, 3e-3, 1e-3, 5e-2):
        for opt in (ours, theirs):
            for g in opt.param_groups:
                g["lr"] = lr
        _set_grads(a, gen)
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.grad = pa.grad.clone()
        ours.step()
        theirs.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[pa][key], theirs.state[pb][key], rtol=0, atol=1e-6)
        assert float(ours.state[pa]["step"]) == float(theirs.state[pb]["step"]) == 5.0
    assert (a[0].weight - _model(0)[0].weight).abs().max() > 1e-3  # the weights moved


def test_bf16_moments_are_the_fp32_moments_rounded_after_one_step() -> None:
    seed = int(torch.randint(0, 1000, (1,)))
    gen = torch.Generator().manual_seed(seed)
    a, ours, b, _ = _pair(torch.bfloat16, seed)
    fp32 = KernelAdamW(_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, moments_dtype=torch.float32)
    _set_grads(a, gen)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    ours.step()
    fp32.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert ours.state[pa]["exp_avg"].dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[pa][key], fp32.state[pb][key].to(torch.bfloat16))
        assert torch.equal(pa, pb)  # this step's update uses the fp32 moments before rounding


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [v.clone() for st in opt.state.values() for v in st.values()]


def test_nan_step_updates_no_weight_no_moment_and_no_step_count() -> None:
    gen = torch.Generator().manual_seed(3)
    model = _model(1)
    opt = KernelAdamW(_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    assert takes_found_inf(opt)
    for _ in range(2):
        _set_grads(model, gen)
        masked_step(opt, torch.tensor(True))
    before = _snapshot(model, opt)
    _set_grads(model, gen, float("nan"))
    masked_step(opt, torch.tensor(False), torch.tensor(float("nan")))
    after = _snapshot(model, opt)
    assert len(after) == 4 + 4 * 3
    for x, y in zip(after, before):
        assert torch.equal(x, y)
    assert [float(st["step"]) for st in opt.state.values()] == [2.0] * 4


def test_clipping_folded_into_the_kernel_equals_clip_then_step() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b = _model(2), _model(2)
    ours = KernelAdamW(_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    twin = KernelAdamW(_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    _set_grads(a, gen, 30.0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    norm = torch.nn.utils.get_total_norm([p.grad for p in a.parameters()])
    assert float(norm) > 1.0
    masked_step(ours, torch.tensor(True), clip_scale(norm, 1.0))
    torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    twin.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def _job(**optim: object) -> JobConfig:
    return JobConfig(model=None, router=None, experts=None, data=None, optim=OptimConfig(**optim), train=TrainConfig(steps=10),  # type: ignore[arg-type]
                     logging=None, checkpoint=None, parallel=None, engine=None)  # type: ignore[arg-type]


def test_build_optimizer_picks_by_moments_dtype_and_refuses_others() -> None:
    model = _model(0)
    fp32, _ = build_optimizer(model, _job())
    assert type(fp32) is torch.optim.AdamW and not fp32.param_groups[0]["fused"]  # CPU: torch's default path, as before
    bf16, _ = build_optimizer(model, _job(moments_dtype="bf16"))
    assert isinstance(bf16, KernelAdamW)
    assert [st["exp_avg_sq"].dtype for st in bf16.state.values()] == [torch.bfloat16] * 4  # created before the first step
    assert [g["weight_decay"] for g in bf16.param_groups] == [0.1, 0.0]
    with pytest.raises(ConfigError, match=r"^optim\.moments_dtype \('fp16'\) must be one of \['fp32', 'bf16'\]$"):
        OptimConfig(moments_dtype="fp16")


def test_load_state_dict_keeps_bf16_moments() -> None:
    model = _model(0)
    opt = KernelAdamW(_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    _set_grads(model, torch.Generator().manual_seed(0))
    opt.step()
    saved = opt.state_dict()
    other = KernelAdamW(_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    other.load_state_dict(saved)
    for p in model.parameters():
        assert other.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(other.state[p]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.slow
def test_bf16_moments_train_like_fp32_ones(tmp_path) -> None:
    """20 CPU steps of the small model: losses within 1e-3 relative of the fp32-moment run at every step (seen:
    at most 7e-5), the first two steps identical (bf16 rounding of the moments first shows in step 3)."""
    from tests.launch.test_train import SMALL, launch, read_metrics

    runs = {}
    for md in ("fp32", "bf16"):
        out = launch(tmp_path / md, *SMALL, "train.steps=20", "train.log_every=1", "train.eval_every=20", "optim.warmup_steps=5",
                     f"optim.moments_dtype={md}")
        assert out.returncode == 0, out.stderr
        runs[md] = read_metrics(tmp_path / md)
    a = [m["loss"] for m in runs["fp32"] if "loss" in m]
    b = [m["loss"] for m in runs["bf16"] if "loss" in m]
    assert len(a) == len(b) == 20 and a[:2] == b[:2] and a != b
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 1e-3
    assert a[-1] < a[0] - 2.0  # both trained
    val = [next(m["val_loss"] for m in runs[md] if "val_loss" in m) for md in ("fp32", "bf16")]
    assert val[1] == pytest.approx(val[0], rel=1e-3)


@pytest.mark.slow
def test_bf16_moments_resume_exactly_and_a_changed_moments_dtype_is_refused(tmp_path) -> None:
    """Saved as bf16 (the checkpoint's metadata), resumed bit-exact; resuming with fp32 names both values."""
    from torch.distributed.checkpoint import FileSystemReader

    from tests.launch.test_train import RESUME, SMALL, launch, straight_and_resumed

    a, b = straight_and_resumed(tmp_path, [*SMALL, *RESUME, "optim.moments_dtype=bf16"])
    assert sorted(b) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert b[step]["loss"] == a[step]["loss"], step
    assert b[8]["val_loss"] == a[8]["val_loss"]
    meta = FileSystemReader(str(tmp_path / "straight" / "checkpoints" / "step_00000008")).read_metadata().state_dict_metadata
    moments = {k: v.properties.dtype for k, v in meta.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert moments and set(moments.values()) == {torch.bfloat16}
    other = launch(tmp_path / "straight", *SMALL, *RESUME, "train.steps=10", "optim.moments_dtype=fp32")
    assert other.returncode == 2
    assert "optim.moments_dtype='bf16'" in other.stderr and "optim.moments_dtype='fp32'" in other.stderr


def test_a_checkpoint_from_before_moments_dtype_holds_fp32_moments(tmp_path) -> None:
    """A manifest without ``optim`` (written before the key existed) resumes with fp32 and is refused with bf16."""
    import json

    from launch.checkpoint import MANIFEST, check_compatible
    from moe.errors import CheckpointError

    (tmp_path / MANIFEST).write_text(json.dumps({"format": 2, "model": {"num_experts": 4}}))
    check_compatible(tmp_path, {"model": {"num_experts": 4}, "optim": {"moments_dtype": "fp32"}})
    with pytest.raises(CheckpointError, match=r"written with optim\.moments_dtype='fp32' but this run has optim\.moments_dtype='bf16'"):
        check_compatible(tmp_path, {"model": {"num_experts": 4}, "optim": {"moments_dtype": "bf16"}})


def _counted_meta_step() -> Any:
    """The ops of one masked KernelAdamW step on ``meta`` (the step budget's GPU), as ``OpCounter`` sees them."""
    from tools.bench.op_counter import OpCounter

    with torch.device("meta"):
        model = _model(0)
        opt = KernelAdamW(_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        ok, scale = torch.empty((), dtype=torch.bool), torch.empty(())
    with OpCounter() as counter:
        masked_step(opt, ok, scale)
    return counter.budget


def test_the_budget_counts_one_launch_per_group_and_20_bytes_per_parameter() -> None:
    """One ``adamw_`` per param group reading p, g (4 B each), m, v (2 B each) and writing p, m, v:
    20 B per parameter, plus a 4-byte step count per tensor and grad_scale and found_inf."""
    ops = [r for r in _counted_meta_step().ops if r.name == "moeforge.adamw_.default"]
    # decay group: weights of 7 x 5 and 5 x 3; no-decay group: biases of 5 and 3
    assert [r.bytes for r in ops] == [20 * (35 + 15) + 2 * 4 + 8, 20 * (5 + 3) + 2 * 4 + 8]
    assert [r.launches for r in ops] == [1, 1]


def test_a_masked_step_reads_nothing_on_the_host() -> None:
    """The verdict and the clipping divisor stay on the device (``tools.bench.op_counter``'s sync detector)."""
    budget = _counted_meta_step()
    assert budget.host_syncs == []
    assert len(budget.ops) > 4  # it saw the step's ops
