"""tools/gpu_session.sh parses, fits a lent GPU's budget (PART=step: <= 6 minutes, few files), its python entry
points import, and its summary puts each measured row beside the prediction."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_session.sh"


def test_script_parses_and_the_step_part_fits_six_minutes() -> None:
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    step_part = text[text.index('if [[ $part == step'):]
    train_limit = int(re.search(r"timeout (\d+) \$py -m launch\.train", step_part).group(1))
    presets = len(re.findall(r'"([^"]+)"', re.search(r"presets=\(([^)]*)\)", step_part).group(1)))
    settings = len(re.findall(r'"([^"]+)"', re.search(r"settings=\(([^)]*)\)", step_part).group(1)))
    assert (presets, settings) == (2, 4)
    assert presets * settings * train_limit + 30 <= 360, train_limit  # + env, summary (the predictions run beside)


def test_python_entry_points_import() -> None:
    modules = set(re.findall(r"\$py -m ([\w.]+)", SCRIPT.read_text())) - {"pytest"}
    assert {"launch.train", "tools.bench.layer", "tools.bench.profile_layer", "tools.bench.compile_check", "tools.bench.step_budget"} <= modules
    for name in sorted(modules):
        if name == "tools.bench.step_budget" and not (REPO / "tools" / "bench" / "step_budget.py").exists():
            continue  # optional: the script prints "predicted: n/a" without it
        assert importlib.util.find_spec(name) is not None, name
    code = "import " + ", ".join(sorted(m for m in modules if importlib.util.find_spec(m) is not None))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]


def test_summary_rows_put_measured_beside_predicted(tmp_path: Path) -> None:
    code = re.search(r"<<'PY'\n(.*?)\nPY\n", SCRIPT.read_text(), re.S).group(1)
    run = tmp_path / "run_0_0"
    run.mkdir()
    rows = [{"step": 5, "loss": 9.0, "tokens_per_s": 1.0, "mfu": 0.1, "peak_mem_gib": 1.0},
            {"step": 10, "loss": 8.0, "tokens_per_s": 123456.0, "mfu": 0.3045, "peak_mem_gib": 41.26},
            {"step": 20, "val_loss": 7.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pred_0_0.json").write_text(json.dumps({"tokens_per_s": 200000.0, "mfu": 0.45, "step_ms": 81.9, "memory_gb": {"peak": 42.9497},
                                                        "classes_gpu_ms": {"gemm": 50.0, "optimizer": 20.5, "other": 9.0}}))
    (run / "profile").mkdir()
    (run / "profile" / "rank0.json").write_text(json.dumps({"steps": [12, 13], "device": "GPU",
                                                            "ms_per_step": {"gemm": 61.25, "optimizer": 19.0, "other": 30.0}}))
    (run / "profile" / "rank0.md").write_text("# Steps 12-13, rank 0\n\nkernel table\n")
    table = tmp_path / "rows.md"
    out = subprocess.run([sys.executable, "-", str(tmp_path), str(table), "moe_125m", "--", "default", "train.compile=true"],
                         input=code, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = table.read_text().splitlines()
    assert lines[2] == "| moe_125m | default | 10 | 123,456 | 30.4% | 41.3 | 200,000 | 45.0% | 40.0 | 82 |"
    assert lines[3] == "| moe_125m | train.compile=true | - | failed | - | - | n/a | n/a | n/a | n/a |"
    # the default run's profile, class by class beside the prediction (largest predicted first)
    assert lines[5:10] == ["| preset (default) | class | measured ms per step | predicted GPU ms |", "|---|---|---:|---:|",
                           "| moe_125m | gemm | 61.25 | 50.00 |", "| moe_125m | optimizer | 19.00 | 20.50 |", "| moe_125m | other | 30.00 | 9.00 |"]
    assert (tmp_path / "step_profiles.md").read_text().startswith("# moe_125m: steps 12-13, rank 0")
