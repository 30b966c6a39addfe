"""tools/gpu_session.sh fits a lent GPU's budget (<= 6 minutes, <= 8 files) and its training summary works."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_session.sh"


def test_script_parses_and_its_timeouts_fit_six_minutes() -> None:
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    limits = [int(n) for n in re.findall(r"timeout (\d+) ", text)]
    limits += [int(n) for n in re.findall(r'timeout "\$\{\w+:-(\d+)\}"', text)]
    trainings = len(re.search(r"for backend in ([^;]+);", text).group(1).split())
    train_limit = int(re.search(r"timeout (\d+) \$py -m launch\.train", text).group(1))
    total = sum(limits) + (trainings - 1) * train_limit  # the training line runs once per backend
    assert trainings == 2 and total <= 360, (limits, trainings, total)


def test_training_summary_row_from_metrics(tmp_path: Path) -> None:
    """The script's embedded summary reads the last throughput window and the last validation loss."""
    code = re.search(r"<<'PY'\n(.*?)\nPY\n", SCRIPT.read_text(), re.S).group(1)
    rows = [{"step": 8, "loss": 9.0, "tokens_per_s": 1.0, "tflops_per_gpu": 1.0, "mfu": 0.1, "peak_mem_gib": 1.0},
            {"step": 16, "loss": 8.0, "tokens_per_s": 123456.0, "tflops_per_gpu": 301.25, "mfu": 0.3045, "peak_mem_gib": 41.26},
            {"step": 24, "val_loss": 7.51234}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-", str(metrics), "auto"], input=code, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "| auto | 16 | 7.5123 | 123,456 | 301.2 | 30.4% | 41.3 |"
