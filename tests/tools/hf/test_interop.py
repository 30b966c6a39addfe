"""Hugging Face interop: tiny random transformers models built here (nothing downloaded), imported into
moeforge checkpoints, exported back, upcycled from dense ones; fp32 logits must agree to 1e-5.

Every architecture goes HF -> moeforge -> HF -> moeforge: the logits of the moeforge model loaded from
the imported checkpoint and of transformers' model loaded from the exported folder are compared with
the original transformers model, and the tensors must come back bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from launch.config import conf_dir  # noqa: E402
from tools.export_hf import export  # noqa: E402
from tools.export_hf import main as export_main  # noqa: E402
from tools.hf.arch import ConversionError  # noqa: E402
from tools.hf.checkpoint import compose_job, load_moeforge_model  # noqa: E402
from tools.import_hf import import_hf  # noqa: E402
from tools.import_hf import main as import_main  # noqa: E402
from tools.upcycle_hf import upcycle  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TOL = 1e-5
SMALL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=None, eos_token_id=None)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral_top2": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    "mixtral_top1": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=24)),
    "qwen3_moe_norm": ("Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=40,
                                                   decoder_sparse_step=2, norm_topk_prob=True)),
    "qwen3_moe_no_norm": ("Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False)),
    "olmoe_tied": ("OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24, norm_topk_prob=False,
                                            tie_word_embeddings=True)),
    "qwen2_moe_shared": ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=40,
                                                     shared_expert_intermediate_size=48, qkv_bias=False, norm_topk_prob=False)),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-scale outputs (HF's 0.02 init makes routing near uniform) and norm gains far from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def hf_model(hf_class: str, extra: dict[str, Any], seed: int = 0) -> Any:
    cls = getattr(transformers, hf_class)
    model = cls(cls.config_class(**{**SMALL, **extra})).eval()
    randomize(model, seed)
    return model


def tokens(seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def save_run_config(path: Path, args: list[str]) -> Path:
    """The ``.hydra/config.yaml`` a ``launch.train <args>`` run would record."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=args)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
    return path


@torch.no_grad()
def moeforge_logits(checkpoint: Path, args: list[str], x: torch.Tensor) -> torch.Tensor:
    job = compose_job(args)
    return load_moeforge_model(checkpoint, job.model, job.router, job.experts)(x)[0]


@pytest.mark.parametrize("case", list(ARCHS))
def test_round_trip_logits_match_transformers(case: str, tmp_path: Path) -> None:
    hf_class, extra = ARCHS[case]
    original = hf_model(hf_class, extra)
    original.save_pretrained(tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        want = original(x).logits

    # HF -> moeforge
    ckpt, args = import_hf(tmp_path / "hf", tmp_path / "mf", ["logging=none"])
    got = moeforge_logits(ckpt, args, x)
    imported = max_diff(got, want)
    assert imported <= TOL, f"{case}: HF -> moeforge max |logit diff| {imported:.3g}"
    assert want.std() > 0.5  # logits far from zero: a dropped term could not hide under the tolerance

    # moeforge -> HF, loaded by transformers itself
    export(ckpt, hf_class_to_arch(hf_class), tmp_path / "hf2", save_run_config(tmp_path / "run.yaml", args))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert type(reloaded).__name__ == hf_class
    with torch.no_grad():
        exported = max_diff(reloaded(x).logits, got)
    assert exported <= TOL, f"{case}: moeforge -> HF max |logit diff| {exported:.3g}"
    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert sorted(after) == sorted(before) and all(torch.equal(before[k], after[k]) for k in before)

    # HF (exported) -> moeforge again: the same tensors, so the same logits bit for bit
    ckpt2, args2 = import_hf(tmp_path / "hf2", tmp_path / "mf2", ["logging=none"])
    assert torch.equal(moeforge_logits(ckpt2, args2, x), got)
    record_parity(case, imported, exported)


PARITY: dict[str, tuple[float, float]] = {}


def record_parity(case: str, imported: float, exported: float) -> None:
    """Collected for the report (printed with -s): max |logit diff| HF->moeforge and moeforge->HF."""
    PARITY[case] = (imported, exported)
    print(f"\nparity {case}: HF->moeforge {imported:.3g}, moeforge->HF {exported:.3g}")


def hf_class_to_arch(hf_class: str) -> str:
    return {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe",
            "Qwen2MoeForCausalLM": "qwen2_moe"}[hf_class]


def test_imported_overrides_rebuild_the_architecture(tmp_path: Path) -> None:
    hf_class, extra = ARCHS["qwen3_moe_norm"]
    hf_model(hf_class, extra).save_pretrained(tmp_path / "hf")
    _, args = import_hf(tmp_path / "hf", tmp_path / "mf")
    assert (tmp_path / "mf" / "overrides.txt").read_text().split() == args
    for want in ("model.qk_norm=per_head", "model.moe_every=2", "model.dense_d_ff=40", "model.d_ff=24", "model.num_kv_heads=2",
                 "model.norm_eps=1e-06", "router.k=2", "router.renormalize=always", "model.rope_theta=10000.0"):
        assert want in args, want
    manifest = json.loads(next((tmp_path / "mf" / "checkpoints").glob("step_*/moeforge.json")).read_text())
    assert manifest["step"] == 0 and manifest["model"]["qk_norm"] == "per_head" and manifest["router"] == {"name": "topk"}


# ------------------------------------------------------------------------------------ refusals


def test_export_refuses_what_the_architecture_cannot_hold(tmp_path: Path) -> None:
    hf_class, extra = ARCHS["olmoe_tied"]
    hf_model(hf_class, extra).save_pretrained(tmp_path / "hf")
    ckpt, args = import_hf(tmp_path / "hf", tmp_path / "mf")
    run = save_run_config(tmp_path / "run.yaml", args)
    with pytest.raises(ConversionError, match=r"cannot export to MixtralForCausalLM: model\.qk_norm='full': its attention has qk_norm='none'"):
        export(ckpt, "mixtral", tmp_path / "out", run)
    with pytest.raises(ConversionError, match=r"Qwen3MoeForCausalLM: model\.qk_norm='full'"):
        export(ckpt, "qwen3_moe", tmp_path / "out", run)
    other = save_run_config(tmp_path / "cf.yaml", [*args, "experts.capacity_factor=1.25"])
    with pytest.raises(ConversionError, match=r"experts\.capacity_factor=1\.25: its MoE blocks are dropless"):
        export(ckpt, "olmoe", tmp_path / "out", other)
    assert not (tmp_path / "out").exists()


def test_export_refuses_another_router_and_switch_top1_for_mixtral(tmp_path: Path) -> None:
    hf_class, extra = ARCHS["mixtral_top1"]
    hf_model(hf_class, extra).save_pretrained(tmp_path / "hf")
    ckpt, args = import_hf(tmp_path / "hf", tmp_path / "mf")
    switch = save_run_config(tmp_path / "a.yaml", [*args, "router.renormalize=auto"])
    with pytest.raises(ConversionError, match=r"router\.renormalize='auto': with router\.k=1 it renormalises"):
        export(ckpt, "mixtral", tmp_path / "out", switch)
    chooser = [a for a in args if not a.startswith("router")] + ["router=expert_choice"]
    cfg = save_run_config(tmp_path / "b.yaml", chooser)
    with pytest.raises(ConversionError, match=r"router\.name='expert_choice'"):
        export(ckpt, "mixtral", tmp_path / "out", cfg)


def test_export_cli_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main([str(tmp_path / "nothing"), "--arch", "olmoe", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeforge: error: ") and "nothing does not exist" in err[0]


@pytest.mark.parametrize("change, message", [
    (dict(qkv_bias=True), r"model\.layers\.0\.self_attn\.k_proj\.bias is a non-zero bias"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), r"rope_parameters=.*only plain RoPE"),
    (dict(use_sliding_window=True, sliding_window=16), r"sliding_window=16"),
    (dict(shared_expert_intermediate_size=30), r"shared_expert_intermediate_size=30 is not a multiple of moe_intermediate_size=24"),
])
def test_import_refuses_what_moeforge_cannot_compute(change: dict[str, Any], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    hf_class, extra = ARCHS["qwen2_moe_shared"]
    hf_model(hf_class, {**extra, **change}).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress lines
    assert import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "mf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeforge: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "mf" / "checkpoints").exists()


def test_import_refuses_pickled_weights_and_other_architectures(tmp_path: Path) -> None:
    model = hf_model(*ARCHS["mixtral_top2"])
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pytorch_model.bin \\(a pickle\\); moeforge reads safetensors only"):
        import_hf(tmp_path / "hf", tmp_path / "mf")
    hf_model("LlamaForCausalLM", dict(intermediate_size=40)).save_pretrained(tmp_path / "dense")
    with pytest.raises(ConversionError, match=r"model_type 'llama' is not a supported MoE architecture"):
        import_hf(tmp_path / "dense", tmp_path / "mf")


# ------------------------------------------------------------------------------------ upcycling


@pytest.mark.parametrize("hf_class, moe_every", [("LlamaForCausalLM", 1), ("Qwen3ForCausalLM", 2)])
def test_upcycled_model_computes_the_dense_model(hf_class: str, moe_every: int, tmp_path: Path) -> None:
    dense = hf_model(hf_class, dict(intermediate_size=40, initializer_range=0.05, head_dim=8))
    dense.save_pretrained(tmp_path / "hf")
    ckpt, args = upcycle(tmp_path / "hf", tmp_path / "mf", num_experts=4, k=2, moe_every=moe_every, extra=["logging=none"])
    x = tokens(1)
    with torch.no_grad():
        want = dense(x).logits
    job = compose_job(args)
    net = load_moeforge_model(ckpt, job.model, job.router, job.experts)
    with torch.no_grad():
        got = net(x)[0]
    diff = max_diff(got, want)
    assert diff <= TOL, f"{hf_class}: upcycled vs dense max |logit diff| {diff:.3g}"
    print(f"\nparity upcycle {hf_class} moe_every={moe_every}: {diff:.3g}")
    layers = net.moe_layers()
    assert [i for i, _ in layers] == [i for i in range(2) if (i + 1) % moe_every == 0]
    for i, layer in layers:
        w = dense.model.layers[i].mlp.gate_proj.weight.t()
        assert all(torch.equal(layer.experts.w_gate_EDF[e], w) for e in range(4))  # exact copies of the dense FFN
        gate = layer.router.gate.weight
        assert abs(float(gate.std()) - 0.05) < 0.01 and abs(float(gate.mean())) < 0.01  # N(0, initializer_range^2)


def test_upcycle_noise_breaks_symmetry_at_the_asked_scale(tmp_path: Path) -> None:
    dense = hf_model("LlamaForCausalLM", dict(intermediate_size=40))
    dense.save_pretrained(tmp_path / "hf")
    ckpt, args = upcycle(tmp_path / "hf", tmp_path / "mf", num_experts=4, k=2, noise=0.1, seed=3)
    job = compose_job(args)
    net = load_moeforge_model(ckpt, job.model, job.router, job.experts)
    w = dense.model.layers[0].mlp.up_proj.weight.t()
    copies = net.moe_layers()[0][1].experts.w_up_EDF
    deltas = [copies[e] - w for e in range(4)]
    for delta in deltas:
        assert abs(float(delta.std()) / float(w.std()) - 0.1) < 0.02
    assert not torch.equal(deltas[0], deltas[1])


def test_upcycle_refuses_nonzero_attention_bias(tmp_path: Path) -> None:
    hf_model("Qwen2ForCausalLM", dict(intermediate_size=40, head_dim=8)).save_pretrained(tmp_path / "hf")  # Qwen2 always has q/k/v biases
    with pytest.raises(ConversionError, match=r"model\.layers\.\d\.self_attn\.[qkv]_proj\.bias is a non-zero bias"):
        upcycle(tmp_path / "hf", tmp_path / "mf", num_experts=4, k=2)


# ------------------------------------------------------------------------------ continued training


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MOEFORGE_DEVICE="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MOEFORGE_RUN_ID"):
        env.pop(key, None)
    return env


def train(run_dir: Path, args: list[str], nproc: int = 1) -> tuple[dict[int, float], str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "launch.train", f"hydra.run.dir={run_dir}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, proc.stderr


@pytest.mark.slow
def test_trainer_continues_from_an_import_at_another_world_size_and_exports(tmp_path: Path) -> None:
    """The imported checkpoint is what the trainer starts from: its first logged loss is the HF model's
    cross-entropy on the trainer's first batch, in one process and under 2-rank expert parallelism;
    the trained checkpoint then exports (config from the run's own .hydra/config.yaml)."""
    hf_class, extra = ARCHS["qwen3_moe_norm"]
    original = hf_model(hf_class, extra, seed=5)
    with torch.no_grad():
        original.lm_head.weight.mul_(4)  # peaked logits: on random tokens its loss is far above a fresh model's ln V
    original.save_pretrained(tmp_path / "hf")
    corpus = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint16)
    corpus.tofile(tmp_path / "tokens.bin")
    common = ["data=memmap", f"data.path={tmp_path / 'tokens.bin'}", "train.batch_size=4", "train.seq_len=32", "train.steps=2",
              "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1", "logging=none", "optim.warmup_steps=0"]
    _, args = import_hf(tmp_path / "hf", tmp_path / "mf", common)

    from launch.data import BatchSampler, memmap_corpus

    job = compose_job(args)
    splits = memmap_corpus(str(tmp_path / "tokens.bin"), "uint16", job.data.val_fraction, 256)
    x, y = BatchSampler(splits.train, 32, 4, job.train.seed).batch(0)
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(original(x).logits.flatten(0, 1), y.flatten()))
    assert want > math.log(256) + 1  # far from a fresh model's ~ln V: the weights must be the imported ones

    args = [a for a in args if not a.startswith(("checkpoint.dir=", "hydra.run.dir="))]
    for name, nproc, extra_args in (("one", 1, []), ("ep2", 2, ["parallel=ep", "parallel.ep_size=2"])):
        ckpts = tmp_path / name / "ckpt"
        shutil.copytree(tmp_path / "mf" / "checkpoints", ckpts)
        losses, stderr = train(tmp_path / name, [*args, f"checkpoint.dir={ckpts}", *extra_args], nproc)
        assert "resumed from" in stderr and "step_00000000" in stderr
        assert losses[1] == pytest.approx(want, rel=1e-5), name
    final = tmp_path / "one" / "ckpt" / "step_00000002"
    out = export(final, "qwen3_moe", tmp_path / "exported")  # no --config: the config.yaml the checkpoint carries
    trained = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    job = compose_job([*args, f"checkpoint.dir={tmp_path / 'one' / 'ckpt'}"])
    net = load_moeforge_model(final, job.model, job.router, job.experts)
    with torch.no_grad():
        assert max_diff(trained(x).logits, net(x)[0]) <= TOL
        assert max_diff(trained(x).logits, original(x).logits) > 1e-3  # two AdamW steps changed the model


# ------------------------------------------------------------------------- folders and command lines


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_import_into_a_folder_with_checkpoints_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    hf_model(*ARCHS["mixtral_top2"]).save_pretrained(tmp_path / "hf")
    # overrides before the source, between the options and at the end (tools/cli.py)
    argv = ["logging=none", str(tmp_path / "hf"), "train.steps=3", "--out", str(tmp_path / "mf"), "train.seq_len=32"]
    assert import_main(argv) == 0
    err = capsys.readouterr().err
    assert "router.aux_loss_coef=0.001 (config.json router_aux_loss_coef), router.z_loss_coef=0" in err
    written = (tmp_path / "mf" / "overrides.txt").read_text().split()
    assert written[-3:] == ["logging=none", "train.steps=3", "train.seq_len=32"]
    assert f"hydra.run.dir={(tmp_path / 'mf').resolve()}" in written and "model.name=imported_mixtral" in written
    assert "router.z_loss_coef=0.0" in written and "router.aux_loss_coef=0.001" in written
    before = tree(tmp_path / "mf")
    assert "checkpoints/step_00000000/config.yaml" in before  # the import describes itself

    hf_model(*ARCHS["mixtral_top2"], seed=1).save_pretrained(tmp_path / "hf_b")
    capsys.readouterr()  # transformers' progress lines
    assert import_main([str(tmp_path / "hf_b"), "--out", str(tmp_path / "mf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "already holds checkpoints" in lines[0] and "step_00000000" in lines[0] and "new --out" in lines[0]
    assert tree(tmp_path / "mf") == before  # nothing touched
    with pytest.raises(ConversionError, match="already holds checkpoints"):
        upcycle(tmp_path / "hf", tmp_path / "mf", num_experts=4, k=2)
    assert tree(tmp_path / "mf") == before


def test_export_needs_no_config_and_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    hf_class, extra = ARCHS["qwen3_moe_norm"]
    hf_model(hf_class, extra).save_pretrained(tmp_path / "hf")
    assert import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "mf")]) == 0
    fresh = tmp_path / "fresh"
    assert export_main([str(tmp_path / "mf"), "--arch", "qwen3_moe", "--out", str(fresh)]) == 0  # an import folder, no --config
    want = tree(fresh)
    assert sorted(want) == ["config.json", "model.safetensors"]

    stale = tmp_path / "stale"
    shutil.copytree(tmp_path / "hf", stale)  # a sharded layout and generation_config.json that must not survive
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (stale / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (stale / "generation_config.json").write_text("{}")
    before = tree(stale)
    capsys.readouterr()
    assert export_main([str(tmp_path / "mf"), "--arch", "qwen3_moe", "--out", str(stale)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not empty" in lines[0] and "--overwrite" in lines[0]
    assert tree(stale) == before
    assert export_main([str(tmp_path / "mf" / "checkpoints" / "step_00000000"), "--arch", "qwen3_moe", "--out", str(stale), "--overwrite"]) == 0
    assert tree(stale) == want  # exactly the new files
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".del-" in p.name]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(stale).eval()
    _, args2 = import_hf(stale, tmp_path / "again")
    assert type(reloaded).__name__ == hf_class and (tmp_path / "again" / "checkpoints" / "step_00000000").is_dir()


@pytest.mark.slow
def test_printed_command_continues_from_any_directory_into_the_import_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf_model(*ARCHS["mixtral_top2"]).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "mf"), "logging=none", "train.steps=2", "train.batch_size=2",
                        "train.seq_len=16", "train.eval_batches=1"]) == 0
    command = capsys.readouterr().err.split("continue training with:\n")[1].strip()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(command, shell=True, cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model imported_mixtral:" in proc.stderr and "resumed from" in proc.stderr
    assert (tmp_path / "mf" / "summary.json").is_file() and (tmp_path / "mf" / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "mf" / "checkpoints").glob("step_*")) == ["step_00000000", "step_00000002"]
    assert not list(elsewhere.iterdir())  # nothing written where the command was run
