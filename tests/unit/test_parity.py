"""Parity with the reference implementation (openai/consistency_models), item by item.

Each test compares cmscale with an independent computation of what the reference does:
piq's LPIPS for the metric, the reference's fp16 loss-scale rule, a hand-written EDM Heun
solve, colourisation's Algorithm 4 start, and CT/CD loss values written out from the
algorithms' definitions.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmscale import losses

# ----------------------------------------------------------------------------- LPIPS


def _random_vgg_and_heads(tmp_path):
    """A random torchvision VGG16 saved as a local weights file, and random positive heads."""
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    heads = [torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    return vgg, str(path), heads


def _with_heads(metric, heads):
    for lin, w in zip(metric.model.lins, heads):
        lin.model[-1].weight.data.copy_(w)
    return metric


@pytest.fixture
def piq_lpips(tmp_path, monkeypatch):
    """piq's LPIPS as the reference builds it, on the test's VGG16 and head weights (piq's
    download of both is patched to return them)."""
    import piq.perceptual

    vgg, path, heads = _random_vgg_and_heads(tmp_path)
    monkeypatch.setattr(piq.perceptual, "vgg16", lambda *a, **k: copy.deepcopy(vgg))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: [h.clone() for h in heads])
    ref = piq.LPIPS(replace_pooling=True, reduction="none")

    def reference(a, b):  # the reference's call: resize below 256 px, then [0, 1]
        if a.shape[-1] < 256:
            a = F.interpolate(a, size=224, mode="bilinear")
            b = F.interpolate(b, size=224, mode="bilinear")
        return ref((a + 1) / 2.0, (b + 1) / 2.0)

    return reference, path, heads


def test_lpips_reference_variant_equals_piq(piq_lpips):
    reference, path, heads = piq_lpips
    torch.manual_seed(1)
    a, b = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    want = reference(a, b)
    got = _with_heads(losses.LPIPS(weights=path, variant="reference"), heads)(a, b)
    assert want.shape == got.shape == (3,)
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got, want)
    # the lpips package's max pooling is a different metric (what cmscale used before)
    old = _with_heads(losses.LPIPS(weights=path, variant="lpips"), heads)(a, b)
    assert ((old - want).abs() / want).max() > 1e-2


def test_lpips_is_computed_in_fp32_under_autocast(tmp_path):
    _, path, heads = _random_vgg_and_heads(tmp_path)
    metric = _with_heads(losses.LPIPS(weights=path), heads)
    torch.manual_seed(2)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    want = metric(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = metric(a.bfloat16(), b.bfloat16())
        low = metric.model(F.interpolate(a, size=224, mode="bilinear") / 2 + 0.5,
                           F.interpolate(b, size=224, mode="bilinear") / 2 + 0.5,
                           normalize=True).flatten()
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs remains
    assert torch.allclose(got, metric(a.bfloat16().float(), b.bfloat16().float()), rtol=1e-6)
    assert torch.allclose(got, want, rtol=2e-2)
    assert ((low.float() - want).abs() / want).max() > 1e-3  # what autocast alone would give


def test_lpips_variant_is_checked():
    with pytest.raises(ValueError, match="variant"):
        losses.LPIPS(random_backbone=True, variant="vgg")
