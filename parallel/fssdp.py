"""Fully sharded sparse data parallelism (FSSDP; Hecate, Qing et al. 2025, arXiv 2502.02581).

Shape legend: T tokens, D model dim, F expert ffn dim, E experts per layer, O experts owned by
this rank, H experts held (materialised) by this rank this step, C elements of one expert chunk
(its three weight matrices flattened: 2*D*F + F*D), W ranks.

Each expert's parameters and optimizer state live on exactly one rank, its owner (the layer's
``Experts`` keeps only the owned rows, ``experts.expert_ids`` names them). Per layer per step:

1. a placement P' (``fssdp_plan.sparse_materialize``, Algorithm 1) decides which ranks hold which
   experts; it comes from the sliding-window mean of all-reduced routing counts of past steps,
   so every rank computes the same P' with no extra communication;
2. SparseAllGather (spAG, §3.1) copies each owner's chunk to the ranks that hold it: one
   ``all_to_all_single`` whose splits every rank derives from (P, P');
3. each routed row goes to a rank holding its expert: itself when it holds it, otherwise the
   holders on its node (else any holder), the rows split evenly among them (§4.4);
4. in backward, SparseReduceScatter (spRS) sums the replicas' gradients into the owner: the
   reverse all-to-all of (2). Owners then hold the sum over all ranks; the runtime divides it
   by the world size like any data-parallel gradient.

Every ``reshard_every`` steps ownership is re-planned for all layers at once
(``fssdp_plan.heterogeneous_shard``, Algorithm 2) and experts that change owner move with their
optimizer state (``FSSDPState.reshard``). With ``rematerialize`` (Hecate-RM) the replicas are
not kept for backward: backward gathers them again and recomputes the expert forward.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe.dispatch import DispatchPlan, combine, gather_rows
from moe.experts import EXPERT_WEIGHT_NAMES, Experts
from parallel.comm import CommMeter, all_to_all_raw
from parallel.host_memory import mark_host
from parallel.fssdp_config import FSSDPConfig
from parallel.fssdp_plan import heterogeneous_shard, initial_owners, plan_digest, sparse_materialize
from parallel.token_exchange import exchange_and_run


@dataclass
class GatherMeta:
    """This rank's part of one (P, P') pair: what spAG sends, receives and assembles."""

    send_idx: Tensor  # rows of the owned chunks [O, C], in send order (peer-major, expert-ascending)
    in_splits: list[int]  # chunks sent to each peer
    out_splits: list[int]  # chunks received from each peer
    h_idx: Tensor  # for each held expert (ascending), its row in cat(owned chunks, received chunks)
    num_owned: int


def gather_meta(owner_E: list[int], holders_E: list[list[int]], rank: int, world: int, device: torch.device) -> GatherMeta:
    """Derive the spAG/spRS splits for ``rank`` from the plan (identical plans -> matching splits)."""
    E = len(owner_E)
    owned = [e for e in range(E) if owner_E[e] == rank]
    held = [e for e in range(E) if rank in holders_E[e]]
    pos_owned = {e: i for i, e in enumerate(owned)}
    send_idx, in_splits = [], []
    for p in range(world):
        out = [pos_owned[e] for e in owned if p != rank and p in holders_E[e]]
        send_idx += out
        in_splits.append(len(out))
    received, out_splits = [], []
    for p in range(world):
        got = [e for e in held if owner_E[e] == p and p != rank]
        received += got
        out_splits.append(len(got))
    pos_recv = {e: len(owned) + i for i, e in enumerate(received)}
    h_idx = [pos_owned[e] if e in pos_owned else pos_recv[e] for e in held]
    as_long = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    return GatherMeta(as_long(send_idx), in_splits, out_splits, as_long(h_idx), len(owned))


def _chunks(ws: tuple[Tensor, ...]) -> Tensor:
    """[O, C]: each expert's three weight matrices flattened side by side."""
    return torch.cat([w.reshape(w.shape[0], math.prod(w.shape[1:])) for w in ws], dim=1)


def _unchunk(c_NC: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    out, offset = [], 0
    for w in like:
        size = math.prod(w.shape[1:])
        out.append(c_NC[:, offset : offset + size].reshape(c_NC.shape[0], *w.shape[1:]))
        offset += size
    return tuple(out)


def sparse_all_gather(meta: GatherMeta, owned: tuple[Tensor, ...], group, meter: CommMeter | None) -> tuple[Tensor, ...]:
    """spAG(P, P'): the held experts' weights [H, ...] from the owners' chunks (no autograd)."""
    own_OC = _chunks(owned)
    recv = all_to_all_raw(own_OC.index_select(0, meta.send_idx), meta.out_splits, meta.in_splits, group, meter, "fssdp_spag")
    return _unchunk(torch.cat([own_OC, recv]).index_select(0, meta.h_idx), owned)


def sparse_reduce_scatter(meta: GatherMeta, grads_H: tuple[Tensor, ...], like: tuple[Tensor, ...], group, meter: CommMeter | None) -> tuple[Tensor, ...]:
    """spRS(P', P): the owners' gradients [O, ...] = sum of every holder's gradient (no autograd)."""
    g_HC = _chunks(grads_H)
    g_all = g_HC.new_zeros(meta.num_owned + sum(meta.out_splits), g_HC.shape[1])
    g_all.index_add_(0, meta.h_idx, g_HC)
    back = all_to_all_raw(g_all[meta.num_owned :], meta.in_splits, meta.out_splits, group, meter, "fssdp_sprs")
    return _unchunk(g_all[: meta.num_owned].index_add(0, meta.send_idx, back), like)


class PendingGather:
    """An spAG started early (``async_op``) so it runs under the preceding attention (§4.2)."""

    def __init__(self, meta: GatherMeta, owned: tuple[Tensor, ...], group, meter: CommMeter | None) -> None:
        self.meta, self.owned = meta, tuple(w.detach() for w in owned)
        self.own_OC = _chunks(self.owned)
        send = self.own_OC.index_select(0, meta.send_idx)
        self.recv = send.new_empty((sum(meta.out_splits), send.shape[1]))
        self.work = None
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            self.work = dist.all_to_all_single(self.recv, send, meta.out_splits, meta.in_splits, group=group, async_op=True)
            if meter is not None:
                me = dist.get_rank(group)
                row = send.shape[1] * send.element_size()
                meter.add("fssdp_spag", (sum(meta.in_splits) - meta.in_splits[me]) * row, (sum(meta.out_splits) - meta.out_splits[me]) * row)
        else:
            self.recv.copy_(send)

    def wait(self) -> tuple[Tensor, ...]:
        if self.work is not None:
            self.work.wait()
        return _unchunk(torch.cat([self.own_OC, self.recv]).index_select(0, self.meta.h_idx), self.owned)


class _SparseAllGather(torch.autograd.Function):
    """spAG in forward (or the wait of a prefetched one), spRS in backward (each one ``all_to_all_single``)."""

    @staticmethod
    def forward(ctx, meta: GatherMeta, group, meter, pending: PendingGather | None, *owned: Tensor):  # type: ignore[override]
        ctx.meta, ctx.group, ctx.meter = meta, group, meter
        ctx.like = tuple(torch.empty((0, *w.shape[1:]), dtype=w.dtype, device=w.device) for w in owned)
        ctx.num_owned = owned[0].shape[0]
        if pending is not None:
            return pending.wait()
        return sparse_all_gather(meta, owned, group, meter)

    @staticmethod
    def backward(ctx, *grads_H: Tensor):  # type: ignore[override]
        like = tuple(t.new_empty((ctx.num_owned, *t.shape[1:])) for t in ctx.like)
        return (None, None, None, None, *sparse_reduce_scatter(ctx.meta, grads_H, like, ctx.group, ctx.meter))


class _RematExperts(torch.autograd.Function):
    """Hecate-RM: run the held experts without keeping the gathered weights; backward gathers
    them again (a second spAG), recomputes the expert forward and reduce-scatters the grads."""

    @staticmethod
    def forward(ctx, meta: GatherMeta, group, meter, pending: PendingGather | None, experts: Experts, x_ND: Tensor, counts_H: Tensor, *owned: Tensor):  # type: ignore[override]
        ctx.meta, ctx.group, ctx.meter, ctx.experts = meta, group, meter, experts
        ctx.save_for_backward(x_ND, counts_H, *owned)
        w_H = pending.wait() if pending is not None else sparse_all_gather(meta, owned, group, meter)
        return experts.grouped_swiglu(x_ND, counts_H, tuple(w_H))

    @staticmethod
    def backward(ctx, g_ND: Tensor):  # type: ignore[override]
        x_ND, counts_H, *owned = ctx.saved_tensors
        w_H = sparse_all_gather(ctx.meta, tuple(owned), ctx.group, ctx.meter)
        with torch.enable_grad():
            x = x_ND.detach().requires_grad_(True)
            ws = [w.detach().requires_grad_(True) for w in w_H]
            y = ctx.experts.grouped_swiglu(x, counts_H, tuple(ws))
            grads = torch.autograd.grad(y, [x, *ws], g_ND, allow_unused=True)
        g_x = grads[0] if grads[0] is not None else torch.zeros_like(x_ND)
        g_w = tuple(g if g is not None else torch.zeros_like(w) for g, w in zip(grads[1:], w_H))
        g_own = sparse_reduce_scatter(ctx.meta, g_w, tuple(owned), ctx.group, ctx.meter)
        return (None, None, None, None, None, g_x, None, *g_own)


class FSSDPLayer:
    """One MoE layer's FSSDP state: owners P, holders P', counts seen since the last step."""

    def __init__(self, experts: Experts, owner_E: list[int], rank: int, world: int) -> None:
        self.experts = experts
        self.num_experts = experts.num_experts
        self.owner_E = owner_E
        self.holders_E = [[o] for o in owner_E]
        self.counts_E = torch.zeros(self.num_experts, dtype=torch.int64)
        self.rank, self.world = rank, world
        self.meta: GatherMeta | None = None
        self.route: tuple[Tensor, Tensor] | None = None

    def owned(self) -> list[int]:
        return [e for e in range(self.num_experts) if self.owner_E[e] == self.rank]

    def held(self) -> list[int]:
        return [e for e in range(self.num_experts) if self.rank in self.holders_E[e]]

    def set_holders(self, holders_E: list[list[int]]) -> None:
        self.holders_E = holders_E
        self.meta = None
        self.route = None

    def routing_table(self, device: torch.device, ranks_per_node: int) -> tuple[Tensor, Tensor]:
        """``pos_EW`` (this rank's rotated index of holder p among e's chosen holders, -1 if not
        chosen) and ``n_E`` (how many holders share e's rows): local first, then same node."""
        if self.route is None:
            E, W, me = self.num_experts, self.world, self.rank
            pos = torch.full((E, W), -1, dtype=torch.int64)
            n = torch.ones(E, dtype=torch.int64)
            for e, hs in enumerate(self.holders_E):
                if me in hs:
                    chosen = [me]
                else:
                    same_node = [h for h in hs if h // ranks_per_node == me // ranks_per_node]
                    chosen = same_node or hs
                k = len(chosen)
                for j, h in enumerate(chosen):
                    pos[e, h] = (j - me) % k  # rotate by source rank so remainders spread
                n[e] = k
            self.route = (pos.to(device), n.to(device))
        return self.route


class FSSDPRunner:
    """The MoE layer's runner under FSSDP (see the module docstring)."""

    def __init__(self, state: FSSDPState, layer: FSSDPLayer) -> None:
        self.state, self.layer = state, layer
        self.pending: PendingGather | None = None

    def _meta(self, device: torch.device) -> GatherMeta:
        lay = self.layer
        if lay.meta is None:
            lay.meta = gather_meta(lay.owner_E, lay.holders_E, self.state.rank, self.state.world, device)
        return lay.meta

    def prefetch(self) -> None:
        """Start this layer's spAG now (called before the block's attention, so the two overlap)."""
        experts = self.layer.experts
        owned = tuple(getattr(experts, n) for n in EXPERT_WEIGHT_NAMES)
        self.pending = PendingGather(self._meta(owned[0].device), owned, self.state.group, self.state.meter)

    def __call__(self, experts: Experts, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        st, lay = self.state, self.layer
        device = x_TD.device
        if experts.training:
            lay.counts_E += plan.counts_E.detach().to(lay.counts_E.device)
        meta = self._meta(device)
        pending, self.pending = self.pending, None
        pos_EW, n_E = lay.routing_table(device, st.ranks_per_node)
        counts_E = plan.counts_E
        base_E, rem_E = counts_E // n_E, counts_E % n_E
        share_EW = torch.where(pos_EW >= 0, base_E[:, None] + (pos_EW < rem_E[:, None]).long(), torch.zeros_like(pos_EW))
        held_H = torch.tensor(lay.held(), dtype=torch.int64, device=device)
        owned = tuple(getattr(experts, n) for n in EXPERT_WEIGHT_NAMES)

        def run_held(x_ND: Tensor, counts_H: Tensor) -> Tensor:
            if st.cfg.rematerialize:
                y = _RematExperts.apply(meta, st.group, st.meter, pending, experts, x_ND, counts_H, *owned)
            else:
                w_H = _SparseAllGather.apply(meta, st.group, st.meter, pending, *owned)
                y = experts.grouped_swiglu(x_ND, counts_H, tuple(w_H))
                if held_H.numel() == 0:  # keep the spAG node in the graph so this rank joins spRS
                    y = y + sum(w.sum() for w in w_H) * 0
            if held_H.numel() == 0:  # and the token exchange's backward
                y = y + x_ND.sum() * 0
            return y

        y_RD = exchange_and_run(gather_rows(x_TD, plan), share_EW.t().contiguous(), held_H, run_held, st.group, st.meter, name="fssdp_a2a_tokens")
        return combine(y_RD, plan, x_TD.shape[0])


class FSSDPState:
    """All MoE layers' FSSDP state and the per-step planning the runtime drives."""

    def __init__(
        self, cfg: FSSDPConfig, group: dist.ProcessGroup | None, rank: int, world: int, ranks_per_node: int, meter: CommMeter | None,
        plan_group: dist.ProcessGroup | None = None,
    ) -> None:
        """``group``/``rank``/``world``: the FSSDP group (every expert owned once inside it) and this
        rank's place in it. ``plan_group`` (default ``group``): the ranks whose routing counts feed
        the plan; with hybrid sharding it is the whole world, so every group computes the same plan
        and the owner of an expert is the same group rank in every group (its replicas)."""
        self.cfg, self.group, self.rank, self.world, self.meter = cfg, group, rank, world, meter
        self.plan_group = group if plan_group is None else plan_group
        self.plan_world = dist.get_world_size(self.plan_group) if dist.is_initialized() else world
        self.ranks_per_node = max(1, min(ranks_per_node, world))
        self.layers: list[FSSDPLayer] = []
        self.window: deque[Tensor] = deque(maxlen=cfg.window)
        self.pending: _PendingCounts | None = None
        self.steps = 0
        self.digests: list[int] = []

    def add_layer(self, experts: Experts) -> FSSDPLayer:
        """Shard ``experts`` homogeneously (owned rows only) and return its state."""
        owner = initial_owners(experts.num_experts, self.world)
        layer = FSSDPLayer(experts, owner, self.rank, self.world)
        owned = layer.owned()
        idx = torch.tensor(owned, dtype=torch.int64)
        for name in EXPERT_WEIGHT_NAMES:
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full.detach().index_select(0, idx.to(full.device)).clone(), requires_grad=full.requires_grad))
        experts.expert_ids = owned
        self.layers.append(layer)
        return layer

    def load_LE(self) -> list[list[int]]:
        """Sliding-window load per layer and expert (sum over the window; same order as the mean)."""
        if not self.window:
            return [[0] * lay.num_experts for lay in self.layers]
        return mark_host(torch.stack(list(self.window)).sum(0)).tolist()

    @torch.no_grad()
    def end_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """After an optimizer step: all-reduce this step's counts, re-own if due, plan P'.

        The counts reach the host one step late: this step's all-reduced counts start an
        asynchronous copy to (pinned) host memory, and the previous step's copy, long finished,
        joins the window. So the plan never makes the host wait for the step just queued; the
        placement for step t+1 uses the window up to step t-1 (Hecate's window is a sliding mean of
        past steps' loads, so one step of lag changes which past steps it covers, not what it is)."""
        if not self.layers:
            return
        self.steps += 1
        counts = torch.stack([lay.counts_E for lay in self.layers])
        device = self.layers[0].experts.w_gate_EDF.device
        counts = counts.to(device)
        if self.plan_world > 1:
            dist.all_reduce(counts, group=self.plan_group)
        previous, self.pending = self.pending, _PendingCounts.start(counts)
        if previous is not None:
            self.window.append(previous.wait())
        for lay in self.layers:
            lay.counts_E.zero_()
        if not self.window:
            return
        load = self.load_LE()
        if self.cfg.reshard_every > 0 and self.steps % self.cfg.reshard_every == 0:
            owners = heterogeneous_shard(load, self.cfg.overlap_degree, self.world, self.ranks_per_node)
            self.reshard(owners, optimizer)
        for lay, load_E in zip(self.layers, load):
            lay.set_holders(sparse_materialize(lay.owner_E, load_E, self.cfg.overlap_degree, self.cfg.memory_cap, self.world, self.ranks_per_node))
        if self.cfg.debug_plan_hash:
            self.check_plan_identical()

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to plan as the uninterrupted run does (JSON-ready, the same on every rank):
        the step count (reshard times), the routing-count window and every layer's owners."""
        return {"steps": self.steps, "world": self.world, "window": [w.tolist() for w in self.window],
                "pending": None if self.pending is None else self.pending.wait().tolist(),
                "owners": [list(lay.owner_E) for lay in self.layers]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> bool:
        """Restore ``state_dict()`` after the weights are loaded: move experts (and their optimizer
        state) to the saved owners, refill the window and plan the holders from it, as ``end_step``
        did before the save. Returns False (nothing changed) when the state is for another world
        size or layer count; the plan then starts afresh."""
        if not state or state.get("world") != self.world or len(state.get("owners", [])) != len(self.layers):
            return False
        self.steps = int(state["steps"])
        self.window.clear()
        self.window.extend(torch.tensor(w, dtype=torch.int64) for w in state["window"])
        pending = state.get("pending")
        self.pending = None if pending is None else _PendingCounts.done(torch.tensor(pending, dtype=torch.int64))
        meter, self.meter = self.meter, None  # restoring is not a training step's traffic
        try:
            self.reshard([list(o) for o in state["owners"]], optimizer)
        finally:
            self.meter = meter
        if self.window:
            for lay, load_E in zip(self.layers, self.load_LE()):
                lay.set_holders(sparse_materialize(lay.owner_E, load_E, self.cfg.overlap_degree, self.cfg.memory_cap, self.world, self.ranks_per_node))
        return True

    def plan_digest(self) -> int:
        return plan_digest([lay.owner_E for lay in self.layers], [lay.holders_E for lay in self.layers])

    def check_plan_identical(self) -> None:
        """All-gather the plan hash; raise if any rank computed a different plan."""
        mine = self.plan_digest()
        self.digests.append(mine)
        if self.plan_world == 1:
            return
        out: list[int | None] = [None] * self.plan_world
        dist.all_gather_object(out, mine, group=self.plan_group)
        if len(set(out)) != 1:
            raise RuntimeError(f"FSSDP plans differ across ranks at step {self.steps}: digests {out}")

    @torch.no_grad()
    def reshard(self, owners_LE: list[list[int]], optimizer: torch.optim.Optimizer | None) -> None:
        """Algorithm 2's move: experts whose owner changes travel with their optimizer state."""
        for lay, new_owner in zip(self.layers, owners_LE):
            if list(new_owner) != lay.owner_E:
                move_ownership(lay, list(new_owner), optimizer, self.group, self.meter)


def _state_keys(optimizer: torch.optim.Optimizer | None, param: Tensor) -> tuple[list[str], dict[str, object]]:
    """(per-expert state keys: tensors shaped like the param, the other state entries)."""
    if optimizer is None or param not in optimizer.state:
        return [], {}
    st = optimizer.state[param]
    per = sorted(k for k, v in st.items() if isinstance(v, Tensor) and v.shape == param.shape)
    other = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items() if k not in per}
    return per, other


def move_ownership(lay: FSSDPLayer, new_owner: list[int], optimizer: torch.optim.Optimizer | None, group, meter: CommMeter | None) -> None:
    """Move parameters and optimizer state of experts whose owner changes (one all-to-all)."""
    experts, rank, world = lay.experts, lay.rank, lay.world
    old_owner = lay.owner_E
    params = [getattr(experts, n) for n in EXPERT_WEIGHT_NAMES]
    keys_and_other = [_state_keys(optimizer, p) for p in params]
    keys = keys_and_other[0][0]
    # One chunk per expert: [params..., state[k] of each param for each per-expert key k].
    tensors = list(params) + [optimizer.state[p][k] for k in keys for p in params] if keys else list(params)
    old_ids = lay.owned()
    pos_old = {e: i for i, e in enumerate(old_ids)}
    chunk_OC = torch.cat([t.detach().reshape(t.shape[0], math.prod(t.shape[1:])) for t in tensors], dim=1)
    send, in_splits = [], []
    for p in range(world):
        go = [pos_old[e] for e in old_ids if new_owner[e] == p and p != rank]
        send += go
        in_splits.append(len(go))
    new_ids = [e for e in range(lay.num_experts) if new_owner[e] == rank]
    recv_ids, out_splits = [], []
    for p in range(world):
        come = [e for e in new_ids if old_owner[e] == p and p != rank]
        recv_ids += come
        out_splits.append(len(come))
    dev = chunk_OC.device
    recv = all_to_all_raw(chunk_OC.index_select(0, torch.tensor(send, dtype=torch.int64, device=dev)), out_splits, in_splits, group, meter, "fssdp_reshard")
    pos_recv = {e: len(old_ids) + i for i, e in enumerate(recv_ids)}
    rows = [pos_old[e] if old_owner[e] == rank else pos_recv[e] for e in new_ids]
    new_NC = torch.cat([chunk_OC, recv]).index_select(0, torch.tensor(rows, dtype=torch.int64, device=dev))
    pieces, offset = [], 0
    for t in tensors:
        size = math.prod(t.shape[1:])
        # ``torch.cat`` promoted bf16 optimizer moments (``optim.moments_dtype=bf16``) to fp32: back, exactly.
        pieces.append(new_NC[:, offset : offset + size].reshape(len(new_ids), *t.shape[1:]).to(t.dtype, copy=True))
        offset += size
    new_params = []
    for i, (name, old) in enumerate(zip(EXPERT_WEIGHT_NAMES, params)):
        new = nn.Parameter(pieces[i], requires_grad=old.requires_grad)
        setattr(experts, name, new)
        new_params.append(new)
        if optimizer is not None:
            _swap_in_optimizer(optimizer, old, new)
            if keys:
                state = dict(keys_and_other[i][1])
                for j, k in enumerate(keys):
                    state[k] = pieces[len(params) + j * len(params) + i]
                optimizer.state[new] = state
    experts.expert_ids = new_ids
    lay.owner_E = new_owner
    lay.meta = None
    lay.route = None


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    optimizer.state.pop(old, None)


class _PendingCounts:
    """One step's all-reduced routing counts on their way to the host (``FSSDPState.end_step``).

    On CUDA the copy goes to pinned memory with ``non_blocking=True`` and an event marks its end;
    ``wait`` then only waits for work queued a whole step earlier. On the CPU it is a plain copy."""

    def __init__(self, host: Tensor, event: Any) -> None:
        self.host, self.event = host, event

    @classmethod
    def start(cls, counts: Tensor) -> _PendingCounts:
        on_cuda = counts.device.type == "cuda"
        host = mark_host(torch.empty(counts.shape, dtype=counts.dtype, pin_memory=on_cuda))
        host.copy_(counts, non_blocking=on_cuda)
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        return cls(host, event)

    @classmethod
    def done(cls, host: Tensor) -> _PendingCounts:
        return cls(mark_host(host), None)

    def wait(self) -> Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host
