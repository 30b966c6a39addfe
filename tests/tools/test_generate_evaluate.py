"""tools.generate and tools.evaluate on a trained checkpoint of prepared (tokenizer.json) data."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch.test_train import SMALL, launch
from tests.tools.test_prepare_data import DOCS, tokenizer_json  # noqa: F401  (a module-scoped fixture)
from tools.evaluate import main as evaluate_main
from tools.generate import main as generate_main
from tools.prepare_data import prepare

pytest.importorskip("tokenizers")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def tool(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run ``python -m tools.<name> <args>`` in this process (its ``main``), capturing its output."""
    def run(name: str, *args: str) -> Result:
        capsys.readouterr()
        code = {"evaluate": evaluate_main, "generate": generate_main}[name](list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return run


@pytest.mark.slow
def test_generate_and_evaluate_a_run_on_prepared_data(tmp_path: Path, tokenizer_json: Path, tool: Callable[..., Result]) -> None:  # noqa: F811
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 8))
    meta = prepare([str(src)], "jsonl", str(tokenizer_json), str(tmp_path / "data"), progress=io.StringIO())
    run = tmp_path / "run"
    data = ["data=memmap", f"data.path={tmp_path / 'data'}", f"model.vocab_size={meta['vocab_size']}", f"data.doc_separator={meta['eos_id']}"]
    out = launch(run, *SMALL, *data, "train.steps=4", "train.eval_batches=3", "train.batch_size=4", "train.seq_len=32")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())

    ev = tool("evaluate", str(run), "--out", str(tmp_path / "eval.json"))
    assert ev.returncode == 0, ev.stderr
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["loss"] == summary["val_loss"]  # the trainer's batches and reduction: the same number
    assert record["tokens"] == 3 * 4 * 32 and record["step"] == 4
    assert record["perplexity"] == pytest.approx(2.718281828459045 ** record["loss"])
    assert list(record["routing"]) == ["layer0", "layer1"]
    for layer in record["routing"].values():
        assert sum(layer["tokens_per_expert"]) == 3 * 4 * 32 * 2 and 0 <= layer["load_cv"] and layer["entropy"] > 0
    line = ev.stderr.strip().splitlines()[-1]
    assert line.startswith(f"moeforge: step 4 validation loss {record['loss']:.4f}") and "layer0 cv" in line
    # data overrides anywhere on the line, other splits and sizes
    again = tool("evaluate", "data=memmap", str(run), f"data.path={tmp_path / 'data'}", "--batches", "2", "--split", "training")
    assert again.returncode == 0, again.stderr
    other = json.loads(again.stdout)
    assert other["split"] == "training" and other["tokens"] == 2 * 4 * 32 and other["loss"] != record["loss"]
    bad = tool("evaluate", str(run), "train.steps=3")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("moeforge: error: only data=")

    prompt = "Document number 3:"
    greedy = tool("generate", str(run / "checkpoints" / "step_00000004"), "--prompt", prompt, "--max-new-tokens", "12")
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout.startswith(prompt) and len(greedy.stdout) > len(prompt) + 1
    assert f"tokenizer {tokenizer_json}" in greedy.stderr and "12 tokens" in greedy.stderr and "(KV cache)" in greedy.stderr
    recomputed = tool("generate", str(run), "--prompt", prompt, "--max-new-tokens", "12", "--no-cache")
    assert recomputed.returncode == 0 and recomputed.stdout == greedy.stdout
    sampled = [tool("generate", str(run), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "0.9",
                    "--seed", str(s)).stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and all(s.startswith(prompt) for s in sampled)
    as_bytes = tool("generate", str(run), "--prompt", "ab", "--max-new-tokens", "20", "--tokenizer", "bytes", "--temperature", "1")
    assert as_bytes.returncode == 0 and as_bytes.stdout.startswith("ab")  # only byte ids sampled, though the model has 400
    refused = tool("generate", str(run), "--prompt", prompt, "--max-new-tokens", "9999")
    assert refused.returncode == 2 and "exceeds model.max_seq_len" in refused.stderr.strip().splitlines()[-1]
