"""Build a saved W&B workspace view for moeforge's routing statistics: one section per MoE layer.

    .venv/bin/python -m tools.wandb_dashboard --entity E --project P                  # 4 layers x 8 experts
    .venv/bin/python -m tools.wandb_dashboard --entity E --project P --run-dir runs/local/2026-11-27/12-00-00
    .venv/bin/python -m tools.wandb_dashboard --entity E --project P --num-layers 12 --moe-every 2 --num-experts 64 --dry-run

Each layer's section holds the load heatmap image, the per-expert load shares (stacked, so expert
identity stays), load CV, max/min load, dead-expert fraction, router entropy, top-1 flips, experts
per token, dropped fraction, and the layer's aux and z losses; a "training" section holds loss,
val_loss, lr, grad_norm and tokens/s. Every line chart uses ``trainer/step`` as its x axis. The
keys come from ``launch/routing_view.py``, the module the W&B sink logs with.

``build_workspace`` only builds the spec (no network); saving needs ``wandb login`` and the
``wandb-workspaces`` package (``pip install -e '.[dashboard]'``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.metrics import WandbSink
from launch.routing_view import LAYER_PANELS, expert_load_key, heatmap_key, layer_key, per_expert_loads

STEP = WandbSink.STEP
TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "val_loss")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens / s", ("tokens_per_s",)),
    ("aux and z loss (all layers)", ("aux_loss", "z_loss")),
)


def moe_layer_indices(num_layers: int, moe_every: int = 1) -> list[int]:
    """The MoE layers of a model, by ``moe.model``'s rule: layer i is MoE when (i + 1) % moe_every == 0."""
    return [i for i in range(num_layers) if (i + 1) % moe_every == 0]


def layer_panels(layer: int, num_experts: int) -> list[Any]:
    """The panels of one layer's section, in display order."""
    import wandb_workspaces.reports.v2 as wr

    panels: list[Any] = [
        wr.MediaBrowser(title=f"layer {layer}: load heatmap (experts x steps)", media_keys=[heatmap_key(layer)], num_columns=1),
        wr.LinePlot(title=f"layer {layer}: load share per expert", x=STEP, plot_type="stacked-area",
                    y=[expert_load_key(layer, j) for j in range(num_experts)]),
    ]
    for title, stats in LAYER_PANELS:
        panels.append(wr.LinePlot(title=f"layer {layer}: {title}", x=STEP, y=[layer_key(layer, s) for s in stats]))
    return panels


def build_workspace(entity: str, project: str, num_layers: int, num_experts: int, moe_every: int = 1,
                    name: str = "moeforge routing") -> Any:
    """The workspace spec: a training section, then one section per MoE layer. Pure: no network."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    training = ws.Section(name="training", is_open=True,
                          panels=[wr.LinePlot(title=title, x=STEP, y=list(keys)) for title, keys in TRAINING_PANELS])
    layers = [ws.Section(name=f"routing/layer{i}", is_open=i == 0, panels=layer_panels(i, num_experts))
              for i in moe_layer_indices(num_layers, moe_every)]
    return ws.Workspace(entity=entity, project=project, name=name, sections=[training, *layers],
                        settings=ws.WorkspaceSettings(x_axis=STEP))


def panel_keys(workspace: Any) -> set[str]:
    """Every metric or media key a panel of ``workspace`` reads (the x axes included)."""
    keys: set[str] = set()
    for section in workspace.sections:
        for panel in section.panels:
            if hasattr(panel, "media_keys"):
                keys.update(panel.media_keys)
            else:
                keys.update(panel.y)
                keys.add(panel.x)
    return keys


def layout_from_run(run_dir: Path) -> tuple[int, int, int]:
    """(num_layers, num_experts, moe_every) that reproduce the MoE layers in ``run_dir/metrics.jsonl``.

    The layers seen are exactly ``moe_layer_indices(last + 1, step)`` when they are evenly spaced
    from ``step - 1``, which is how ``moe.model`` places them.
    """
    loads: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        loads.update(per_expert_loads(json.loads(line)))
    if not loads:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no routing/layer*/tokens_per_expert")
    layers = sorted(loads)
    every = layers[0] + 1
    if layers != moe_layer_indices(layers[-1] + 1, every):
        raise SystemExit(f"MoE layers {layers} are not every {every}-th layer; pass --num-layers/--moe-every")
    return layers[-1] + 1, len(loads[layers[0]]), every


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team) that owns the project")
    parser.add_argument("--project", required=True, help="W&B project the runs log to (logging.project)")
    parser.add_argument("--run-dir", type=Path, help="read the layer and expert counts from this run's metrics.jsonl")
    parser.add_argument("--num-layers", type=int, default=4, help="model.num_layers (ignored with --run-dir)")
    parser.add_argument("--moe-every", type=int, default=1, help="model.moe_every (ignored with --run-dir)")
    parser.add_argument("--num-experts", type=int, default=8, help="model.num_experts (ignored with --run-dir)")
    parser.add_argument("--name", default="moeforge routing", help="the saved view's name")
    parser.add_argument("--dry-run", action="store_true", help="print the sections and panels; save nothing")
    args = parser.parse_args(argv)
    layout = layout_from_run(args.run_dir) if args.run_dir else (args.num_layers, args.num_experts, args.moe_every)
    workspace = build_workspace(args.entity, args.project, layout[0], layout[1], layout[2], args.name)
    for section in workspace.sections:
        print(f"{section.name}: " + ", ".join(p.title for p in section.panels))
    if not args.dry_run:
        workspace.save()  # needs the network and `wandb login`
        print(f"saved: {workspace.url}")


if __name__ == "__main__":
    main()
