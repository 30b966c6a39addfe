"""Model presets: their parameter counts agree with the published models, and the README shows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.model_presets import describe, preset_names, table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_preset_is_listed_tiny_first() -> None:
    assert preset_names()[0] == "tiny"
    assert {"tiny", "moe_125m", "olmoe_1b_7b", "mixtral_8x7b"} <= set(preset_names())


@pytest.mark.slow
def test_presets_match_published_sizes_and_the_readme_table() -> None:
    # Published totals: OLMoE-1B-7B 6.9B total, 1.3B active with the 0.1B input embedding
    # (Muennighoff et al. 2024); Mixtral 8x7B 46.7B total, 12.9B active (Jiang et al. 2024).
    olmoe, mixtral = describe("olmoe_1b_7b"), describe("mixtral_8x7b")
    assert olmoe.total == pytest.approx(6.9e9, rel=0.01)
    assert olmoe.active + 50304 * 2048 == pytest.approx(1.3e9, rel=0.02)
    assert mixtral.total == pytest.approx(46.7e9, rel=0.001)
    assert mixtral.active + 32000 * 4096 == pytest.approx(12.9e9, rel=0.01)
    assert describe("moe_125m").active == pytest.approx(125e6, rel=0.01)
    assert table() in README.read_text(), "README presets table is stale: paste `python -m tools.model_presets`"
