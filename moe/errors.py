"""The project's exception hierarchy.

Every user-facing check raises one of these with a message that names the key, the value and the
rule (``router.k (0) must be >= 1``). ``assert`` is kept for internal invariants only.
``MoeforgeError``, ``ConfigError`` and ``check`` are defined in ``kernels.errors`` (the bottom
package, which raises them too) and are the same objects here.
"""

from __future__ import annotations

from kernels.errors import ConfigError, MoeforgeError, check  # noqa: F401  (re-exported: moe.errors is their public home)


class DataError(MoeforgeError):
    """A data file or corpus is missing, empty or malformed."""


class CheckpointError(MoeforgeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class SetupError(MoeforgeError):
    """The machine's setup is unusable: a missing package, a device that is absent or oversubscribed,
    a malformed torchrun or ``MOEFORGE_*`` environment variable."""

