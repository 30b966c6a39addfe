"""DCP reads and writes that never unpickle an object a checkpoint's author chose.

``torch.distributed.checkpoint`` stores tensors safely (each one is read back with
``torch.load(weights_only=True)``), but it pickles everything else: a non-tensor value in the
state (an int, a list of param-group floats) is written with ``torch.save`` and read back with
``torch.load(weights_only=False)`` (``DefaultLoadPlanner.load_bytes``), and the ``.metadata`` file
is a plain pickle (``FileSystemReader.read_metadata``). Either one runs its author's code when a
run resumes from someone else's checkpoint. So moeforge:

- gives DCP tensors only: ``split_state`` takes every non-tensor value out of the state, and the
  checkpoint stores them as JSON (``objects.json``), restored by ``merge_objects``;
- reads ``.metadata`` with ``read_metadata``, an unpickler that can only build the handful of
  classes DCP's metadata is made of (the "restricting globals" recipe of the ``pickle`` docs);
  anything else, ``os.system`` included, is refused before it is called;
- loads with ``TensorOnlyPlanner``, which refuses a pickled value instead of unpickling it.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from moe.errors import CheckpointError

METADATA = ".metadata"

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, ``torch.Size``, dtypes and paths; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which DCP metadata never holds")


def read_metadata(path: Path) -> Metadata:
    """The DCP ``Metadata`` of checkpoint ``path``, read without running code from the file.

    Raises ``CheckpointError`` naming the file when it is missing, not a pickle, names a global
    outside the allowlist, or declares a non-tensor (pickled) entry.
    """
    file = path / METADATA
    try:
        with file.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise CheckpointError(f"{file}: cannot be read safely ({err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not DCP metadata")
    pickled = [key for key, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]
    if pickled:
        raise CheckpointError(f"{file}: entry {pickled[0]!r} is a pickled object; moeforge checkpoints hold tensors only")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through ``read_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: never written by moeforge
            raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
        return read_metadata(Path(self.path))


class TensorOnlyPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that refuses to unpickle a value (it would run ``torch.load(weights_only=False)``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; refused")


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, objects): the same nesting of dicts, tensors in the first, every other value in the second."""
    tensors: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            t, o = split_state(value)
            if t:
                tensors[key] = t
            if o:
                objects[key] = o
        elif isinstance(value, Tensor):
            tensors[key] = value
        else:
            _check_plain(value, key)
            objects[key] = value
    return tensors, objects


def _check_plain(value: Any, where: str) -> None:
    """Internal invariant: only JSON-representable values (and tuples) leave the tensor path."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{where}: non-string key {k!r}"
            _check_plain(v, f"{where}.{k}")
    else:
        assert value is None or isinstance(value, (bool, int, float, str)), f"{where}: {type(value).__name__} cannot go to JSON"


def merge_objects(state: dict[str, Any], objects: dict[str, Any]) -> None:
    """Write ``objects`` (from ``split_state``, via JSON) back into ``state`` in place.

    JSON has no tuples: where ``state`` holds a tuple (AdamW's ``betas``), the loaded list becomes
    one again, so a resumed optimizer sees the same types as an uninterrupted one.
    """
    for key, value in objects.items():
        current = state.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merge_objects(current, value)
        else:
            state[key] = _like(current, value)


def _like(template: Any, value: Any) -> Any:
    """``value`` with the container types of ``template`` (tuples where it has tuples)."""
    if isinstance(template, dict) and isinstance(value, dict):
        return {k: _like(template.get(k), v) for k, v in value.items()}
    if isinstance(template, (list, tuple)) and isinstance(value, list):
        items = [_like(t, v) for t, v in zip(template, value)] if len(template) == len(value) else value
        return tuple(items) if isinstance(template, tuple) else items
    return value


def objects_to_json(objects: dict[str, Any]) -> str:
    """JSON text of the non-tensor values (floats round-trip exactly; NaN/inf are kept as JSON extensions)."""
    return json.dumps(objects, indent=1, sort_keys=True)


def objects_from_json(text: str, where: Path) -> dict[str, Any]:
    try:
        objects = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(objects, dict):
        raise CheckpointError(f"{where}: holds a {type(objects).__name__}, not a JSON object")
    return objects
