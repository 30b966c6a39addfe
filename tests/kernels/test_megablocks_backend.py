"""The optional MegaBlocks backend: a clean one-line reason when absent, the torch loop's result when present."""

from __future__ import annotations

import pytest
import torch

import moe.expert_backends.megablocks_adapter as mb
from moe.errors import SetupError
from moe.expert_backends import swiglu_loop


def test_unavailable_reason_is_one_line_and_call_raises():
    if mb.UNAVAILABLE_REASON is None:
        pytest.skip("megablocks with grouped_gemm is installed; covered by the GPU test below")
    assert "\n" not in mb.UNAVAILABLE_REASON and "megablocks" in mb.UNAVAILABLE_REASON
    # The refusal names every release on the package index and what it pins, and the way out.
    for release, pin in [("0.10.0", "pins torch 2.7.0"), ("0.9.0 and 0.8.0", "torch 2.6.0"), ("0.7.0", "torch 2.5.1"),
                         ("0.6.1", "torch 2.4.0"), ("0.5.0", "triton 2.1.0"), ("0.5.1, 0.0.2 and 0.0.1", "pin no torch")]:
        assert f"{release} {pin}" in mb.UNAVAILABLE_REASON, (release, mb.UNAVAILABLE_REASON)
    assert "torch>=2.9" in mb.UNAVAILABLE_REASON and "experts.backend=grouped_mm" in mb.UNAVAILABLE_REASON
    with pytest.raises(SetupError, match="experts.backend=megablocks"):
        mb.swiglu_megablocks(torch.ones(2, 16), torch.tensor([2]), torch.ones(1, 16, 16), torch.ones(1, 16, 16), torch.ones(1, 16, 16))


@pytest.mark.skipif(mb.UNAVAILABLE_REASON is not None or not torch.cuda.is_available(), reason=mb.UNAVAILABLE_REASON or "needs a CUDA GPU")
def test_megablocks_matches_torch_loop(kc, gen):
    counts_E = torch.tensor([40, 0, 3, 21])
    x_RD = torch.randn(64, 64, generator=gen).cuda().bfloat16()
    weights = [w.detach().bfloat16() for w in kc.make_weights(4, 64, 128, gen)]
    kc.assert_close_scaled(mb.swiglu_megablocks(x_RD, counts_E.cuda(), *weights), swiglu_loop(x_RD.float(), counts_E, *(w.float() for w in weights)))
