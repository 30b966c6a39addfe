"""HostSyncCounter catches each way Python code reads device values, and only those."""

from __future__ import annotations

import pytest
import torch

from tools.bench.host_syncs import HostSyncCounter, mark_host


@pytest.mark.parametrize(("kind", "read"), [
    ("item", lambda t: t.sum().item()),
    ("tolist", lambda t: t.tolist()),
    ("bool", lambda t: bool(t[0] > 0)),
    ("bool", lambda t: 1 if t.sum() > 0 else 0),
    ("float", lambda t: float(t[0])),
    ("nonzero", lambda t: t.nonzero()),
    ("nonzero", lambda t: torch.nonzero(t)),
    ("cpu", lambda t: t.cpu()),
    ("masked_select", lambda t: torch.masked_select(t, t > 0)),
    ("index", lambda t: t[t > 0]),
    ("repeat_interleave", lambda t: torch.repeat_interleave(torch.tensor([1, 2]))),
])
def test_each_kind_of_read_is_counted_once(kind: str, read) -> None:
    t = torch.randn(5)
    with HostSyncCounter() as syncs:
        read(t)
    assert dict(syncs.kinds) == {kind: 1}, syncs.describe()
    assert "tests/tools/bench/test_host_syncs.py" in syncs.describe()


def test_device_only_work_and_marked_host_tensors_are_not_counted() -> None:
    t = torch.randn(64, 8, requires_grad=True)
    flags = mark_host(torch.zeros(3))
    with HostSyncCounter() as syncs:
        y = torch.where(t > 0, t, 0.0).pow(2).sum() + torch.nonzero_static(t[:, 0] > 0, size=4).sum()
        y.backward()
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 1]), output_size=4)
        t.detach().masked_fill_(t.detach() > 1, 0.0)
        flags.copy_(t.detach()[0, :3])
        flags.tolist()
    assert syncs.total == 0, syncs.describe()


def test_counter_restores_the_tensor_methods() -> None:
    before = torch.Tensor.item, torch.Tensor.tolist, torch.nonzero
    with HostSyncCounter():
        pass
    assert (torch.Tensor.item, torch.Tensor.tolist, torch.nonzero) == before


def test_sites_name_the_module_whose_forward_read() -> None:
    class Reads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float(x.detach().sum())

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Reads(), Reads())
    with HostSyncCounter(model) as syncs:
        model(torch.randn(2, 3))
    assert dict(syncs.kinds) == {"float": 2}
    assert sorted(site.split(" in ")[1] for site in syncs.sites) == ["1", "2"]
