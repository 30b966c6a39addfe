"""Process group and DeviceMesh from the torchrun environment.

This is the only module that reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE``. The backend follows the device: NCCL when CUDA is available, gloo on CPU;
``MOEFORGE_DEVICE=cpu`` keeps the ranks on the CPU (gloo) on a machine with GPUs (the test suite
does this for its CPU ranks), and a node with more ranks than GPUs is refused before NCCL would
put two ranks on one GPU.
Without torchrun (no ``WORLD_SIZE``) a parallel mode still gets a one-rank gloo/NCCL group, so
every code path is the same in one process and in many.

Layout (the mesh dims, outer to inner; the mode's object in ``parallel.modes`` decides, through
``needs_expert_mesh`` and ``expert_group_size``):

- ``ep`` mode: ``("edp", "ep")`` of shape ``(W / ep_size, ep_size)``. Expert-parallel groups are
  blocks of consecutive ranks (on one node when ep_size <= GPUs per node); expert-data-parallel
  groups are strided (DeepSpeed's ``_create_expert_and_data_parallel`` layout).
- ``fssdp`` mode with ``parallel.fssdp.shard_size`` S < W: the same 2-D mesh of shape (W / S, S):
  the inner ``ep`` dim is an FSSDP group (every expert owned once inside it), the outer ``edp``
  dim joins the replicas of one owner across groups.
- every mode also has ``("dp",)`` of shape ``(W,)`` (dense data parallelism).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moe.errors import SetupError
from parallel.config import ParallelConfig
from parallel.modes import check_world, names_where, parallel_mode
from parallel.runtime import MeshInfo


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SetupError(f"environment variable {name} ({raw!r}) must be an integer") from None


def torchrun_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's variables; (0, 1, 0, 1) without."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world) or not (0 <= local_rank < local_world) or world % local_world:
        raise SetupError(
            f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}"
        )
    return rank, world, local_rank, local_world


def use_cuda(local_world: int, wanted: str = "auto") -> bool:
    """Whether this process runs on a GPU: CUDA is there and neither ``wanted`` (``train.device``)
    nor the environment variable ``MOEFORGE_DEVICE`` (which wins when set) says ``cpu``.

    Raises ``SetupError`` when the node runs more ranks than it has GPUs (NCCL would put two
    ranks on one GPU and fail with 'Duplicate GPU detected' deep inside the first collective)."""
    choice = os.environ.get("MOEFORGE_DEVICE", wanted)
    if choice not in ("auto", "cpu", "cuda"):
        raise SetupError(f"environment variable MOEFORGE_DEVICE ({choice!r}) must be auto, cpu or cuda")
    if choice == "cpu":
        return False
    if not torch.cuda.is_available():
        if choice == "cuda":
            raise SetupError("MOEFORGE_DEVICE=cuda but torch sees no CUDA device")
        return False
    gpus = torch.cuda.device_count()
    if local_world > gpus:
        raise SetupError(
            f"{local_world} ranks on this node but {gpus} GPU(s): run at most {gpus} per node "
            "(torchrun --nproc-per-node), or MOEFORGE_DEVICE=cpu for CPU ranks (gloo)"
        )
    return True


def init_mesh(cfg: ParallelConfig, device: str = "auto") -> MeshInfo:
    """Initialise the default process group (if a parallel mode asks for one) and the DeviceMesh
    on ``device`` (auto | cpu | cuda; see ``use_cuda``)."""
    rank, world, local_rank, local_world = torchrun_env()
    cuda = use_cuda(local_world, device)
    device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    mode = parallel_mode(cfg.mode)
    if not mode.distributed:
        if world > 1:
            raise SetupError(f"parallel.mode ({cfg.mode!r}) runs one process but WORLD_SIZE is {world}; "
                             f"pick parallel={'|'.join(names_where(lambda m: m.distributed))}")
        return MeshInfo(rank, world, local_rank, local_world, device, backend, None)
    check_world(cfg, world)
    if not dist.is_initialized():
        timeout = timedelta(seconds=cfg.timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, device_id=device if cuda else None)
        else:  # one process outside torchrun: an in-memory store is enough
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    device_type = "cuda" if cuda else "cpu"
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    ep, ep_mesh = 1, None
    if mode.needs_expert_mesh(cfg, world):
        ep = mode.expert_group_size(cfg, world)
        ep_mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    return MeshInfo(rank, world, local_rank, local_world, device, backend, mesh, ep_mesh, ep_size=ep)
