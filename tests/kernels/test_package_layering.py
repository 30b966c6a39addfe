"""kernels/ is the bottom package (tests/test_house.py checks that it imports nothing above it), and its refusals are still the
project's ``ConfigError``, caught by ``except moe.errors.ConfigError`` with the message unchanged."""

from __future__ import annotations

import pytest

from kernels.layout import BlockSizes
from moe.errors import ConfigError, MoeforgeError


def test_a_bad_block_size_is_the_projects_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^kernels\.block_m \(48\) must be a power of two >= 16 \(tl\.dot's minimum\)$") as err:
        BlockSizes(block_m=48)
    assert isinstance(err.value, MoeforgeError) and isinstance(err.value, ValueError)
