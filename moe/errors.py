"""The project's exception hierarchy.

Every user-facing check raises one of these with a message that names the key, the value and the
rule (``router.k (0) must be >= 1``). ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class MoeforgeError(Exception):
    """Base of every error moeforge raises on purpose."""


class ConfigError(MoeforgeError, ValueError):
    """A configuration value is invalid; raised before any compute starts."""


class DataError(MoeforgeError):
    """A data file or corpus is missing, empty or malformed."""


class CheckpointError(MoeforgeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class SetupError(MoeforgeError):
    """The machine's setup is unusable: a missing package, a device that is absent or oversubscribed,
    a malformed torchrun or ``MOEFORGE_*`` environment variable."""


def check(ok: bool, key: str, value: object, rule: str) -> None:
    """Raise ``ConfigError`` naming ``key``, its ``value`` and the ``rule`` unless ``ok``.

    >>> check(3 > 0, "router.k", 3, "must be >= 1")
    """
    if not ok:
        raise ConfigError(f"{key} ({value!r}) {rule}")
