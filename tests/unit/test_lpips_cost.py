"""The cheaper LPIPS evaluation (cmscale.losses.lpips_distance) computes the lpips package's
value and gradient up to float rounding."""
import pytest
import torch
import torch.nn.functional as F

from cmscale import losses

pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def metric():
    torch.manual_seed(0)
    return losses.LPIPS(random_backbone=True)  # the same computation as with VGG16 weights


def package(model, a, b):
    """The lpips package's own call, as the metric made it before (two resizes, NCHW input)."""
    up = lambda t: F.interpolate(t, size=224, mode="bilinear", align_corners=False)  # noqa: E731
    return model((up(a) + 1) / 2, (up(b) + 1) / 2, normalize=True).reshape(a.shape[0])


def test_lpips_distance_equals_the_package_value_and_gradient(metric):
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1).requires_grad_()
    b = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    ours = metric(a, b)
    ref = package(metric.model, a, b)
    assert ours.shape == (2,) and torch.all(ours > 0)
    # float32 rounding of sums over up to 512 channels x 224^2 positions, in another order
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    (ga,) = torch.autograd.grad(ours.sum(), a)
    (gr,) = torch.autograd.grad(ref.sum(), a)
    # Through 13 convolutions and ReLUs: a rounding-level change of a pre-activation near 0
    # moves single entries by more; the gradient as a whole agrees to float rounding.
    rel = ((ga - gr).norm() / gr.norm()).item()
    assert rel < 1e-3
    # only the online image gets a gradient; the target's features took no autograd graph
    b.requires_grad_()
    d = losses.lpips_distance(metric.model, a, b)
    assert torch.autograd.grad(d.sum(), b, allow_unused=True)[0] is None
    # the bf16 option stays close to the float32 value
    d16 = losses.lpips_distance(metric.model, a.detach(), b.detach(), dtype=torch.bfloat16)
    torch.testing.assert_close(d16, ref.detach(), rtol=5e-2, atol=1e-3)


def test_grey_images_are_measured_as_rgb_with_tied_channels(metric):
    """A one-channel (data.channels=1) run's images: the VGG sees them as R = G = B."""
    g = torch.Generator().manual_seed(2)
    a, b = (torch.rand(2, 1, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    grey = metric(a, b)
    assert grey.shape == (2,) and torch.all(grey > 0)
    torch.testing.assert_close(grey, metric(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)),
                               rtol=0, atol=0)
