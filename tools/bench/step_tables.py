"""The README's predicted-throughput tables, regenerated from ``tools.bench.step_budget`` and ``tools.bench.step_parallel``.

    python -m tools.bench.step_tables            # both markdown tables on stdout

One GPU: each row's config runs as written with ``python -m launch.train``, ``parallel=none``;
H100 SXM and H200 columns. Many GPUs: the full ``olmoe_1b_7b`` and ``mixtral_8x7b`` on 8 and 64
H100s (8 per node), 16,384 tokens per GPU (4 sequences of 4,096), at the layout and
recomputation ``tools.bench.step_parallel.recommend`` picks. The "measured" columns stay empty until a
GPU run fills them (``tools/gpu_session.sh``).
"""

from __future__ import annotations

from tools.bench.card_rates import CARDS
from tools.bench.step_budget import count_step, predict, report
from tools.bench.step_parallel import recommend

ONE_GPU: tuple[tuple[str, list[str]], ...] = (
    ("moe_125m", ["model=moe_125m", "train.batch_size=8", "train.seq_len=2048"]),
    ("moe_125m, CUDA graphs", ["model=moe_125m", "train.batch_size=8", "train.seq_len=2048", "train.cuda_graphs=true"]),
    ("moe_125m, fastest", ["model=moe_125m", "train.batch_size=8", "train.seq_len=2048", "train.cuda_graphs=true",
                           "optim.master_weights=true", "optim.moments_dtype=bf16"]),
    ("olmoe_1b_7b, 4 layers", ["model=olmoe_1b_7b", "model.num_layers=4", "train.batch_size=8", "train.seq_len=2048"]),
    ("olmoe_1b_7b, 4 layers, bf16 moments", ["model=olmoe_1b_7b", "model.num_layers=4", "train.batch_size=8", "train.seq_len=2048",
                                            "optim.moments_dtype=bf16"]),
    ("olmoe_1b_7b, 4 layers, fastest", ["model=olmoe_1b_7b", "model.num_layers=4", "train.batch_size=8", "train.seq_len=2048",
                                       "optim.master_weights=true", "optim.moments_dtype=bf16"]),
    ("olmoe_1b_7b", ["model=olmoe_1b_7b", "train.batch_size=4", "train.seq_len=4096", "train.activation_checkpointing=full"]),
)
MANY_GPUS: tuple[tuple[str, int], ...] = (("olmoe_1b_7b", 8), ("olmoe_1b_7b", 64), ("mixtral_8x7b", 8), ("mixtral_8x7b", 64))


def one_gpu_table() -> str:
    lines = [
        "| config (bf16, `parallel=none`) | card | tokens/step | predicted tokens/s | predicted MFU | predicted memory GB | measured tokens/s | measured MFU | measured memory GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, overrides in ONE_GPU:
        count = count_step(overrides, "h200")
        for card in ("h100", "h200"):
            rep = report(count, predict(count, CARDS[card]))
            peak = rep["memory_gb"]["peak"]
            fits = "" if peak <= CARDS[card].memory_gb else " (does not fit)"
            lines.append(f"| `{' '.join(overrides)}` | {card.upper()} | {rep['tokens_per_step']:,} | {rep['tokens_per_s']:,.0f} | "
                         f"{rep['mfu']:.1%} | {peak:.1f}{fits} |  |  |  |")
    return "\n".join(lines)


def many_gpus_table() -> str:
    lines = [
        "| model | H100s | recommended layout | activation_checkpointing | predicted tokens/s (all GPUs) | predicted MFU | comm ms of step ms | predicted memory per GPU GB | measured tokens/s | measured MFU |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, gpus in MANY_GPUS:
        overrides = [f"model={model}", f"train.batch_size={4 * gpus}", "train.seq_len=4096"]
        r = recommend(overrides, gpus, "h100")
        fits = "" if r["fits"] else " (does not fit)"
        lines.append(f"| `{model}` | {gpus} | `{r['layout']}` | {r['activation_checkpointing']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                     f"{r['comm_ms']:.0f} of {r['step_ms']:.0f} | {r['memory_gb']['peak']:.1f}{fits} |  |  |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(one_gpu_table())
    print()
    print(many_gpus_table())
