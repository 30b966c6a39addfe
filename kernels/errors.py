"""The root of moeforge's exception hierarchy, here because ``kernels`` is the bottom package.

``kernels`` imports nothing of moeforge's above it, yet its launch parameters
(``kernels.layout.BlockSizes``) are user configuration and must fail as one: with
``ConfigError`` naming the key, the value and the rule. So the base class, ``ConfigError`` and
``check`` are defined here, and ``moe.errors`` (the hierarchy's public home, which adds the data,
checkpoint and environment errors) re-exports these same classes: ``except ConfigError`` catches
a kernel's refusal whichever module the name was imported from.
"""

from __future__ import annotations


class MoeforgeError(Exception):
    """Base of every error moeforge raises on purpose."""


class ConfigError(MoeforgeError, ValueError):
    """A configuration value is invalid; raised before any compute starts."""


def check(ok: bool, key: str, value: object, rule: str) -> None:
    """Raise ``ConfigError`` naming ``key``, its ``value`` and the ``rule`` unless ``ok``.

    >>> check(3 > 0, "router.k", 3, "must be >= 1")
    """
    if not ok:
        raise ConfigError(f"{key} ({value!r}) {rule}")
