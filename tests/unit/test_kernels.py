"""Fused kernels (cmscale.kernels) against their PyTorch references.

The Triton kernels run on this CPU under ``TRITON_INTERPRET=1`` (set here before the kernels
are first imported; Triton decides at import whether to interpret). Shapes are tiny: the
interpreter executes every program instance in numpy.

Tolerances (values of order 1; against the float32 reference on the same inputs): float32
1e-5 absolute for values, gradients and JVPs (accumulation order differs); bfloat16 inputs
2e-2 absolute plus 1e-2 relative (the output is one bf16 number: 2^-7 relative per unit in
the last place). Sums over the batch and positions (weight, bias, scale, shift gradients)
get the tolerance times sqrt(terms).
"""
import math
import os

# Before Triton is first imported in this process: the flag is read once, at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cmscale import kernels as K  # noqa: E402
from cmscale.ema import ShardedAverage, ShardedTarget, update_averages  # noqa: E402
from cmscale.kernels import reference as R  # noqa: E402
from cmscale.networks import create_unet  # noqa: E402

pytest.importorskip("triton")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what net.kernels=triton checks on a CPU


def close(a, b, tol):
    rtol = 1e-2 if tol >= TOL[torch.bfloat16] else 0.0
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=rtol)


def adm_qkv(b, heads, d, length, dtype, seed=0):
    """q, k, v as the ADM block makes them: strided (B, H, L, d) views of one qkv tensor."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 3 * heads * d, length, generator=g).to(dtype)
    return [t.transpose(-1, -2) for t in qkv.reshape(b, 3, heads, d, length).unbind(1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [20, 80])  # one partial block; two blocks of 64
def test_attention_values_gradients_and_jvp_match_the_reference(dtype, length):
    q, k, v = adm_qkv(2, 2, 8, length, dtype)
    tol = TOL[dtype]
    # the reference in float32 on the same (rounded) inputs
    ref = lambda a, b, c: R.attention_math(a.float(), b.float(), c.float())  # noqa: E731
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    o = K.attention(qs, ks, vs, kernels="triton")
    assert o.dtype == dtype and o.shape == (2, 2, length, 8)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_ref = ref(qr, kr, vr)
    close(o, o_ref, tol)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(o, (qs, ks, vs), g.to(dtype))
    grads_ref = torch.autograd.grad(o_ref, (qr, kr, vr), g)
    for a, b in zip(grads, grads_ref):
        close(a, b, tol * 2)
    tangents = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2 + i)).to(dtype)
                for i, t in enumerate((q, k, v))]
    out, tan = torch.func.jvp(lambda a, b, c: K.attention(a, b, c, kernels="triton"),
                              (q, k, v), tuple(tangents))
    out_ref, tan_ref = torch.func.jvp(ref, (q, k, v), tuple(tangents))
    close(out, out_ref, tol)
    close(tan, tan_ref, tol * 2)


def test_attention_jvp_with_some_inputs_constant():
    q, k, v = adm_qkv(1, 2, 8, 20, torch.float32)
    tq = torch.randn_like(q)
    out, tan = torch.func.jvp(lambda a: K.attention(a, k, v, kernels="triton"), (q,), (tq,))
    _, tan_ref = torch.func.jvp(lambda a: R.attention_math(a, k, v), (q,), (tq,))
    close(tan, tan_ref, 1e-5)


def test_torch_reference_attention_is_sdpa_and_supports_jvp():
    q, k, v = adm_qkv(2, 2, 8, 20, torch.float32)
    # no tangent: exactly the fused SDPA the network used before (bitwise)
    assert torch.equal(K.attention(q, k, v, kernels="torch"),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    out, tan = torch.func.jvp(lambda a, b, c: K.attention(a, b, c, kernels="torch"),
                              (q, k, v), tangents)
    # JVP against a central finite difference in float64
    f = lambda eps: R.attention_math(*(t.double() + eps * d.double()  # noqa: E731
                                        for t, d in zip((q, k, v), tangents)))
    fd = (f(1e-6) - f(-1e-6)) / 2e-6
    close(out, f(0.0), 1e-5)
    close(tan, fd, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_group_norm_silu_values_and_gradients_match_the_reference(dtype, scale_shift,
                                                                  monkeypatch):
    from cmscale.kernels import triton_kernels as T

    # tiles of 16 positions: the 40 positions below take three (the last one partial)
    monkeypatch.setattr(T, "_gn_blocks", lambda cpg, hw: (triton_pow2(cpg), 16))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 12, 5, 8, generator=g) * 3 + 1).to(dtype)
    w = torch.randn(12, generator=g) + 1
    b = torch.randn(12, generator=g)
    s, t = (torch.randn(2, 12, generator=g).to(dtype) if scale_shift else None for _ in "st")
    inputs = [x, w, b] + ([s, t] if scale_shift else [])
    ours = [a.detach().requires_grad_() for a in inputs]
    refs = [a.detach().float().requires_grad_() for a in inputs]
    pad = [None, None] if not scale_shift else []
    y = K.group_norm_silu(ours[0], 4, *ours[1:3], 1e-5, *(ours[3:] + pad), kernels="triton")
    y_ref = R.group_norm_silu(refs[0], 4, *refs[1:3], 1e-5, *(refs[3:] + pad))
    assert y.dtype == dtype
    tol = TOL[dtype]
    close(y, y_ref, tol)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, ours, dy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, refs, dy)
    for name, a, r in zip("x w b scale shift".split(), grads, grads_ref):
        # weight/bias gradients sum over the batch and all positions: scale the tolerance
        n = 1 if name in ("x",) else (40 if name in ("scale", "shift") else 80)
        close(a, r, tol * (1 if dtype == torch.float32 else 2) * math.sqrt(n))


def triton_pow2(n):
    return 1 << (n - 1).bit_length()


def test_group_norm_silu_torch_path_is_the_unfused_network_and_jvp_falls_back():
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight, generator=g)
    x = torch.randn(2, 8, 4, 4, generator=g)
    s, t = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    unfused = torch.nn.functional.silu(norm(x) * (1 + s[:, :, None, None]) + t[:, :, None, None])
    fused = K.group_norm_silu(x, 4, norm.weight, norm.bias, norm.eps, s, t, kernels="torch")
    assert torch.equal(fused, unfused)
    # forward-mode AD: the Triton choice takes the reference path (no JVP rule of its own)
    f = lambda a: K.group_norm_silu(a, 4, norm.weight, norm.bias, norm.eps, s, t,  # noqa: E731
                                    kernels="triton")
    dx = torch.randn_like(x)
    _, tan = torch.func.jvp(f, (x,), (dx,))
    _, tan_ref = torch.func.jvp(lambda a: R.group_norm_silu(a, 4, norm.weight, norm.bias,
                                                            norm.eps, s, t), (x,), (dx,))
    assert torch.equal(tan, tan_ref)


def test_fused_average_update_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(7, generator=g), torch.randn(2, 3, generator=g), torch.randn(1000, generator=g)]
    n = sum(t.numel() for t in src)
    rates = [0.0, 0.5, 0.9, 0.99, 0.9999]  # five: two launches of up to four
    ours = [torch.randn(n + 3, generator=g) for _ in rates]  # padded like a shard
    theirs = [a.clone() for a in ours]
    K.ema_update([a[:n] for a in ours], src, rates, kernels="triton")
    R.ema_update([a[:n] for a in theirs], src, rates)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert torch.equal(a[n:], b[n:])  # the padding is untouched
    assert torch.equal(ours[0][:n], torch.cat([t.reshape(-1) for t in src]))  # rate 0: a copy


@pytest.mark.parametrize("world", [1, 3])
def test_update_averages_equals_separate_updates_bitwise(world):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    for rank in range(world):
        together = (ShardedTarget(net, rank, world), [ShardedAverage(net, r, rank, world)
                                                      for r in (0.9, 0.999)])
        apart = (ShardedTarget(net, rank, world), [ShardedAverage(net, r, rank, world)
                                                   for r in (0.9, 0.999)])
        for step in range(3):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p))
            update_averages(together[0], together[1], 0.5, net.parameters(), "torch")
            apart[0].update(0.5, list(net.parameters()))
            for e in apart[1]:
                e.update(list(net.parameters()))
        for a, b in zip([together[0], *together[1]], [apart[0], *apart[1]]):
            assert torch.equal(a.local, b.local)
        with pytest.raises(ValueError, match="rate"):
            update_averages(together[0], together[1], 1.0, net.parameters(), "torch")


def test_auto_falls_back_to_torch_without_a_gpu_or_triton(monkeypatch):
    assert K.resolve("auto", "cpu") == "torch"  # triton is installed here, but no GPU
    monkeypatch.setattr(K, "triton_available", lambda: True)
    assert K.resolve("auto", "cuda") == "triton"
    monkeypatch.setattr(K, "triton_available", lambda: False)
    assert K.resolve("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="not installed"):
        K.resolve("triton", "cuda")
    monkeypatch.setattr(K, "triton_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        K.resolve("triton", "cpu")
    with pytest.raises(ValueError, match="net.kernels"):
        K.resolve("cuda", "cpu")
    # the network on a CPU with auto: the reference ops, bitwise
    torch.manual_seed(0)
    auto = create_unet("tiny16", kernels="auto").eval()
    plain = create_unet("tiny16", kernels="torch").eval()
    plain.load_state_dict(auto.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 2.0])
    assert torch.equal(auto(x, t), plain(x, t))


def _perturbed_unet(kernels):
    torch.manual_seed(0)
    net = create_unet("tiny16", image_size=8, attention_resolutions=(4,), kernels=kernels)
    with torch.no_grad():  # zero-initialised output convs would hide most of the network
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.slow
def test_unet_with_triton_kernels_matches_torch_values_gradients_and_jvp():
    ours, ref = _perturbed_unet("triton"), _perturbed_unet("torch")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0])
    y, y_ref = ours(x, t), ref(x, t)
    close(y, y_ref, 1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    # sCM's tangent: d/dt of the network along (dx, dt)
    dx, dt = torch.randn_like(x), torch.ones(2)
    with torch.no_grad():
        _, tan = torch.func.jvp(ours, (x, t), (dx, dt))
        _, tan_ref = torch.func.jvp(ref, (x, t), (dx, dt))
    close(tan, tan_ref, 1e-4)


def test_kernels_config_reaches_the_network():
    from cmscale.config import ConfigError, load_config
    from cmscale.methods import build_net

    net = build_net(load_config(None, ["net.kernels=torch"]))
    kinds = {m.kernels for m in net.modules() if hasattr(m, "kernels")}
    assert kinds == {"torch"}
    with pytest.raises(ConfigError, match="net.kernels"):
        load_config(None, ["net.kernels=cuda"])
    assert os.environ["TRITON_INTERPRET"] == "1"
