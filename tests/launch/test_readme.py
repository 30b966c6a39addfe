"""The README works for a newcomer: commands run inside the environment, and it points only at files that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.test_train import REPO

README = (REPO / "README.md").read_text()
TOOLS = ("python", "python3", "torchrun", "pytest", "wandb")


def command_lines() -> list[tuple[int, str]]:
    """(line number, command) for every command line of every fenced block (``$ `` prompts stripped)."""
    out, fenced = [], False
    for number, line in enumerate(README.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced and line.strip():
            out.append((number, line.strip().removeprefix("$ ")))
    return out


def program(command: str) -> str:
    """The program a shell line runs, after its ``VAR=value`` assignments."""
    words = [w for w in command.split() if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    return words[0] if words else ""


def test_every_command_runs_inside_the_environment() -> None:
    activate = next(n for n, c in command_lines() if c.startswith("source .venv/bin/activate"))
    bare = [(n, c) for n, c in command_lines() if program(c) in TOOLS and n < activate]
    assert bare == []  # before the activation step, every command names .venv/bin/ explicitly
    first_use = min(n for n, c in command_lines() if ".venv/bin/python -m" in c)
    assert first_use < activate  # the two commands at the top come first and work from a fresh clone
    own = README[README.index("### Checkpoints and resume"):README.index("## Benchmarks")]
    assert not re.search(r"^(\$ )?(\w+=\S+ )*(python|torchrun) ", own, flags=re.M)  # the run/torchrun sections spell it out


def test_readme_refers_only_to_files_in_the_repo() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert target.startswith("http") or (REPO / target).exists(), target
    for path in re.findall(r"`((?:launch|tools|tests|conf|docs|moe|parallel|kernels)/[\w./-]+\.(?:py|sh|sbatch|md|yaml))`", README):
        assert (REPO / path).exists(), path
    assert "shared/" not in README


# --------------------------------------------------------------------- the README's commands, run

RUN_SECTIONS = [("## Quick start", "## Configuration"), ("### Data: prepare your own corpus", "### Checkpoints and resume"),
                ("## Interop", "## Layout")]
NOT_RUN = {
    "bash launch/setup_env.sh": "the install itself: this test runs inside the installed environment",
    '.venv/bin/pip install -e ".[hf]"': "an install (the hf extra is part of dev)",
    ".venv/bin/python -m pytest -n 2": "the test suite this test belongs to",
}
SHORT = ["train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.log_every=1", "logging=none"]
TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=32", "model.dense_d_ff=64", "model.num_experts=4"]
FEW_BYTES = ["data.max_bytes=200000"]
"""What the test may append: overrides that make the model tiny and the run short, nothing else."""


def command_blocks(start: str, end: str) -> list[str]:
    """The fenced ``bash`` blocks between the headings ``start`` and ``end``, in order."""
    section = README[README.index(start + "\n"):README.index(end + "\n")]
    return [b.strip("\n") for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def shortened(line: str) -> str:
    """``line`` with the appended overrides its program allows (see SHORT/TINY)."""
    own_model = "overrides.txt" not in line and "data=memmap" not in line  # imports and prepared data fix their own shapes
    stdlib = "data=memmap" not in line
    if re.search(r"-m launch\.train\b", line):
        extra = [*SHORT, *(TINY if own_model else []), *(FEW_BYTES if stdlib else [])]
    elif re.search(r"-m tools\.(import_hf|upcycle_hf)\b", line):
        extra = [*SHORT, *FEW_BYTES]
    elif re.search(r"-m tools\.generate\b", line):
        extra = ["--max-new-tokens", "8"]
    elif re.search(r"-m tools\.evaluate\b", line):
        extra = ["--batches", "1"]
    else:
        return line
    return line + " " + " ".join(extra)


def make_inputs(work: Path) -> None:
    """What a user brings: a JSONL corpus, a tokenizer.json (400 ids, <|endoftext|> = 0), a dense HF Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = [f"def f{i}(x):\n    return x * {i}  # document {i}\n" * (i % 5 + 1) for i in range(300)]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    tok.save(str(work / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.get_vocab_size() <= 400

    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None, bos_token_id=None,
                                   eos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(work / "hf" / "llama")


@pytest.mark.slow
def test_quick_start_data_and_interop_commands_run_as_written(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))  # the README's .venv/bin/... is this environment
    make_inputs(work)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOEFORGE_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    env.pop("MOEFORGE_RUN_ID", None)
    skipped = set()
    for start, end in RUN_SECTIONS:
        for block in command_blocks(start, end):
            lines = [line for line in block.splitlines() if line.strip()]
            if all(line.strip() in NOT_RUN for line in lines):
                skipped.update(line.strip() for line in lines)
                continue
            script = "set -euo pipefail\n" + "\n".join(shortened(line) for line in block.splitlines()) + "\n"
            proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{start}: this block failed:\n{block}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert skipped == set(NOT_RUN)  # each command the test does not run is still in the README, as listed
    for made in ("runs/local/summary.json", "runs/local/eval.json", "data/mine/meta.json", "runs/mine/summary.json",
                 "hf/mixtral/config.json", "runs/mixtral_cpt/summary.json", "runs/upcycled/summary.json"):
        assert (work / made).is_file(), made
    cpt = json.loads((work / "runs/mixtral_cpt/summary.json").read_text())
    assert cpt["step"] == 2 and sorted(p.name for p in (work / "runs/mixtral_cpt/checkpoints").glob("step_*")) == ["step_00000000",
                                                                                                           "step_00000002"]
