"""Triton kernels: attention (forward, backward, forward-mode JVP), GroupNorm + scale-shift +
SiLU (forward, backward), and one fused update of several averages.

Imported only when ``net.kernels`` resolves to ``triton`` (``cmscale.kernels``). Triton needs a
CUDA GPU; on a CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is
imported: ``triton.jit`` decides at decoration time), which is what the tests do.
Accumulation is in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- attention
#
# q, k, v: (B, H, L, d) of any strides (the ADM block's views of its qkv convolution).
# The forward keeps the log-sum-exp per query row, lse_i = log sum_j exp(s_ij), so that the
# backward and the JVP recompute the probabilities p_ij = exp(s_ij - lse_i) exactly in one pass.


def _blocks(length: int, d: int) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16
    block_d = max(16, triton.next_power_of_2(d))
    block = max(16, min(64, triton.next_power_of_2(length)))
    return block, block, block_d


@triton.jit
def _load_rows(ptr, base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask,
                   other=0.0)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
              sob, soh, sol, sod, H, L, D, scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn0 = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, b * sqb + h * sqh, rm, rd, sql, sqd, L, D).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        rn = start + rn0
        k = _load_rows(K, b * skb + h * skh, rn, rd, skl, skd, L, D).to(tl.float32)
        v = _load_rows(V, b * svb + h * svh, rn, rd, svl, svd, L, D).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(rn[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    o = acc / l_i[:, None]
    mask = (rm[:, None] < L) & (rd[None, :] < D)
    tl.store(O + b * sob + h * soh + rm[:, None] * sol + rd[None, :] * sod,
             o.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + bh * L + rm, m_i + tl.log(l_i), mask=rm < L)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sql, sqd, skb, skh, skl, skd,
                   svb, svh, svl, svd, H, L, D, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dO, dK, dV are contiguous (B, H, L, d); one program per block of keys
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm0 = tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    k = _load_rows(K, b * skb + h * skh, rn, rd, skl, skd, L, D).to(tl.float32)
    v = _load_rows(V, b * svb + h * svh, rn, rd, svl, svd, L, D).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_M):
        rm = start + rm0
        q = _load_rows(Q, b * sqb + h * sqh, rm, rd, sql, sqd, L, D).to(tl.float32)
        do = _load_rows(DO, bh * L * D, rm, rd, D, 1, L, D).to(tl.float32)
        lse = tl.load(LSE + bh * L + rm, mask=rm < L, other=0.0)
        delta = tl.load(DELTA + bh * L + rm, mask=rm < L, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        valid = (rm[:, None] < L) & (rn[None, :] < L)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    mask = (rn[:, None] < L) & (rd[None, :] < D)
    offs = bh * L * D + rn[:, None] * D + rd[None, :]
    tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sql, sqd, skb, skh, skl, skd,
                 svb, svh, svl, svd, H, L, D, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per block of queries: no atomics, deterministic
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn0 = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, b * sqb + h * sqh, rm, rd, sql, sqd, L, D).to(tl.float32)
    do = _load_rows(DO, bh * L * D, rm, rd, D, 1, L, D).to(tl.float32)
    lse = tl.load(LSE + bh * L + rm, mask=rm < L, other=0.0)
    delta = tl.load(DELTA + bh * L + rm, mask=rm < L, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        rn = start + rn0
        k = _load_rows(K, b * skb + h * skh, rn, rd, skl, skd, L, D).to(tl.float32)
        v = _load_rows(V, b * svb + h * svh, rn, rd, svl, svd, L, D).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        valid = (rm[:, None] < L) & (rn[None, :] < L)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision="ieee")
    mask = (rm[:, None] < L) & (rd[None, :] < D)
    tl.store(DQ + bh * L * D + rm[:, None] * D + rd[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=mask)


@triton.jit
def _attn_jvp(Q, K, V, TQ, TK, TV, O, LSE, TO, sqb, sqh, sql, sqd, skb, skh, skl, skd,
              svb, svh, svl, svd, H, L, D, scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Tangents tq, tk, tv share q, k, v's strides; O and TO are contiguous (B, H, L, d).
    # With p_ij = exp(s_ij - lse_i) and ds_ij = scale (tq_i k_j + q_i tk_j):
    #   to_i = sum_j p_ij (ds_ij v_j + tv_j) - (sum_j p_ij ds_ij) o_i
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn0 = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, b * sqb + h * sqh, rm, rd, sql, sqd, L, D).to(tl.float32)
    tq = _load_rows(TQ, b * sqb + h * sqh, rm, rd, sql, sqd, L, D).to(tl.float32)
    lse = tl.load(LSE + bh * L + rm, mask=rm < L, other=0.0)
    mu = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        rn = start + rn0
        k = _load_rows(K, b * skb + h * skh, rn, rd, skl, skd, L, D).to(tl.float32)
        tk = _load_rows(TK, b * skb + h * skh, rn, rd, skl, skd, L, D).to(tl.float32)
        v = _load_rows(V, b * svb + h * svh, rn, rd, svl, svd, L, D).to(tl.float32)
        tv = _load_rows(TV, b * svb + h * svh, rn, rd, svl, svd, L, D).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        valid = (rm[:, None] < L) & (rn[None, :] < L)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        ds = (tl.dot(tq, tl.trans(k), input_precision="ieee")
              + tl.dot(q, tl.trans(tk), input_precision="ieee")) * scale
        pds = p * ds
        mu += tl.sum(pds, 1)
        acc += tl.dot(pds, v, input_precision="ieee") + tl.dot(p, tv, input_precision="ieee")
    mask = (rm[:, None] < L) & (rd[None, :] < D)
    offs = bh * L * D + rm[:, None] * D + rd[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(TO + offs, (acc - mu[:, None] * o).to(TO.dtype.element_ty), mask=mask)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _as(like: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    # a tangent with exactly ``like``'s strides (the kernel reads both with one set)
    out = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
    return out.zero_() if t is None else out.copy_(t)


class TritonAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v with Triton forward, backward and forward-mode JVP."""

    @staticmethod
    def forward(q, k, v):
        B, H, L, D = q.shape
        o = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
        bm, bn, bd = _blocks(L, D)
        _attn_fwd[(triton.cdiv(L, bm), B * H)](
            q, k, v, o, lse, *_strides(q, k, v, o), H, L, D, 1.0 / math.sqrt(D),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, L, D = q.shape
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq, dk, dv = (torch.empty((B, H, L, D), dtype=t.dtype, device=t.device)
                      for t in (q, k, v))
        bm, bn, bd = _blocks(L, D)
        args = (*_strides(q, k, v), H, L, D, 1.0 / math.sqrt(D))
        _attn_bwd_dkdv[(triton.cdiv(L, bn), B * H)](q, k, v, do, lse, delta, dk, dv, *args,
                                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        _attn_bwd_dq[(triton.cdiv(L, bm), B * H)](q, k, v, do, lse, delta, dq, *args,
                                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        return dq, dk, dv

    @staticmethod
    def jvp(ctx, tq, tk, tv):
        q, k, v, o, lse = ctx.saved_tensors
        # through a dispatcher op: under torch.func.jvp these are functorch wrappers, which
        # the op's dispatch unwraps before the kernel sees raw storage
        return _attention_jvp(q, k, v, _as(q, tq), _as(k, tk), _as(v, tv), o, lse), None


@torch.library.custom_op("cmscale::attention_jvp", mutates_args=())
def _attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor,
                   tk: torch.Tensor, tv: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor) -> torch.Tensor:
    B, H, L, D = q.shape
    to = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    bm, bn, bd = _blocks(L, D)
    _attn_jvp[(triton.cdiv(L, bm), B * H)](
        q, k, v, tq, tk, tv, o.contiguous(), lse, to, *_strides(q, k, v), H, L, D,
        1.0 / math.sqrt(D), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return to


@_attention_jvp.register_fake
def _(q, k, v, tq, tk, tv, o, lse):
    return q.new_empty(q.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return TritonAttention.apply(q, k, v)[0]


# ----------------------------------------------------------------------------- GroupNorm+SiLU
#
# y = silu(z), z = n (1 + s) + t (or z = n without scale-shift), n = xhat w + b,
# xhat = (x - mean_g) rstd_g. One program per (sample, group), looping over the group's
# channels x positions in tiles; x is contiguous NCHW.


def _gn_blocks(cpg: int, hw: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(cpg)
    block_hw = max(16, min(triton.next_power_of_2(hw), max(16, 4096 // block_c)))
    return block_c, block_hw


@triton.jit
def _gn_fwd(X, W, Bi, S, T, Y, MEAN, RSTD, C, HW, G, CPG, eps,
            HAS_SS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    rc = tl.arange(0, BLOCK_C)
    c = g * CPG + rc
    cmask = rc < CPG
    base = b * C * HW
    n = CPG * HW
    acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw[None, :] < HW)
        acc += tl.load(X + base + c[:, None] * HW + hw[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, 1), 0) / n
    acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for start in range(0, HW, BLOCK_HW):  # second pass: variance about the mean (stable)
        hw = start + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw[None, :] < HW)
        x = tl.load(X + base + c[:, None] * HW + hw[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, 1), 0) / n + eps)
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(Bi + c, mask=cmask, other=0.0).to(tl.float32)
    a1 = w * rstd  # z = x a1 + a0 per channel (before scale-shift)
    a0 = bias - mean * a1
    if HAS_SS:
        s = 1.0 + tl.load(S + b * C + c, mask=cmask, other=0.0).to(tl.float32)
        t = tl.load(T + b * C + c, mask=cmask, other=0.0).to(tl.float32)
        a1 = a1 * s
        a0 = a0 * s + t
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw[None, :] < HW)
        offs = base + c[:, None] * HW + hw[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        z = x * a1[:, None] + a0[:, None]
        tl.store(Y + offs, (z * tl.sigmoid(z)).to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)


@triton.jit
def _gn_bwd(DY, X, W, Bi, S, T, MEAN, RSTD, DX, DW, DB, DS, DT, C, HW, G, CPG,
            HAS_SS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # DW, DB: per-sample partial sums (B, C), summed over the batch by the caller.
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    rc = tl.arange(0, BLOCK_C)
    c = g * CPG + rc
    cmask = rc < CPG
    base = b * C * HW
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(Bi + c, mask=cmask, other=0.0).to(tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32) + 1.0
    t = tl.zeros([BLOCK_C], tl.float32)
    if HAS_SS:
        s = 1.0 + tl.load(S + b * C + c, mask=cmask, other=0.0).to(tl.float32)
        t = tl.load(T + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)  # sum dn xhat
    db = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)  # sum dn
    ds = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)  # sum dz n
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw[None, :] < HW)
        offs = base + c[:, None] * HW + hw[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        nrm = xhat * w[:, None] + bias[:, None]
        z = nrm * s[:, None] + t[:, None]
        sig = tl.sigmoid(z)
        dz = tl.where(m, dy * sig * (1.0 + z * (1.0 - sig)), 0.0)
        dn = dz * s[:, None]
        dw += dn * xhat
        db += dn
        ds += dz * nrm
    dw_c = tl.sum(dw, 1)
    db_c = tl.sum(db, 1)
    tl.store(DW + b * C + c, dw_c, mask=cmask)
    tl.store(DB + b * C + c, db_c, mask=cmask)
    if HAS_SS:
        tl.store(DS + b * C + c, tl.sum(ds, 1), mask=cmask)
        tl.store(DT + b * C + c, db_c / s, mask=cmask)  # sum dz = sum dn / (1 + scale)
    n = CPG * HW
    mean_a = tl.sum(w * db_c, 0) / n     # mean over the group of dn w
    mean_b = tl.sum(w * dw_c, 0) / n     # mean over the group of dn w xhat
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw[None, :] < HW)
        offs = base + c[:, None] * HW + hw[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        z = (xhat * w[:, None] + bias[:, None]) * s[:, None] + t[:, None]
        sig = tl.sigmoid(z)
        dn = dy * sig * (1.0 + z * (1.0 - sig)) * s[:, None]
        dx = (dn * w[:, None] - mean_a - xhat * mean_b) * rstd
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m)


class TritonGroupNormSiLU(torch.autograd.Function):
    """silu(GroupNorm(x) * (1 + scale) + shift) in one pass over x (two more for statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps):
        x = x.contiguous()
        B, C = x.shape[:2]
        HW = x[0, 0].numel()
        cpg = C // groups
        has_ss = scale is not None
        if has_ss:
            scale, shift = scale.contiguous(), shift.contiguous()
        y = torch.empty_like(x)
        mean = torch.empty(B * groups, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        bc, bhw = _gn_blocks(cpg, HW)
        _gn_fwd[(B * groups,)](x, weight, bias, scale if has_ss else x, shift if has_ss else x,
                               y, mean, rstd, C, HW, groups, cpg, eps,
                               HAS_SS=has_ss, BLOCK_C=bc, BLOCK_HW=bhw)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups, ctx.has_ss = groups, has_ss
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        B, C = x.shape[:2]
        HW = x[0, 0].numel()
        groups, has_ss = ctx.groups, ctx.has_ss
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        part = [torch.empty(B, C, dtype=torch.float32, device=x.device) for _ in range(4)]
        bc, bhw = _gn_blocks(C // groups, HW)
        _gn_bwd[(B * groups,)](dy, x, weight, bias, scale if has_ss else x,
                               shift if has_ss else x, mean, rstd, dx, *part, C, HW, groups,
                               C // groups, HAS_SS=has_ss, BLOCK_C=bc, BLOCK_HW=bhw)
        dw, db, ds, dt = part
        dw, db = dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)
        if has_ss:
            return dx, dw, db, ds.to(scale.dtype), dt.to(shift.dtype), None, None
        return dx, dw, db, None, None, None, None


def group_norm_silu(x, groups, weight, bias, eps, scale=None, shift=None):
    return TritonGroupNormSiLU.apply(x, weight, bias, scale, shift, groups, eps)


# ----------------------------------------------------------------------------- averages

_MAX_AVERAGES = 4  # averages per launch; more are done in further launches


@triton.jit
def _ema_update(SRC, A0, A1, A2, A3, r0, r1, r2, r3, N,
                K: tl.constexpr, BLOCK: tl.constexpr):
    # src read once; each average read and written once: a <- r a + (1 - r) src
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    src = tl.load(SRC + offs, mask=m).to(tl.float32)
    a = tl.load(A0 + offs, mask=m)
    tl.store(A0 + offs, a * r0 + src * (1.0 - r0), mask=m)
    if K > 1:
        a = tl.load(A1 + offs, mask=m)
        tl.store(A1 + offs, a * r1 + src * (1.0 - r1), mask=m)
    if K > 2:
        a = tl.load(A2 + offs, mask=m)
        tl.store(A2 + offs, a * r2 + src * (1.0 - r2), mask=m)
    if K > 3:
        a = tl.load(A3 + offs, mask=m)
        tl.store(A3 + offs, a * r3 + src * (1.0 - r3), mask=m)


@torch.no_grad()
def ema_update(averages, src, rates) -> None:
    """``reference.ema_update`` in one pass: ``src`` concatenated once, then read once for
    up to four averages per launch."""
    if not src or not averages:
        return
    flat_src = torch.cat([t.reshape(-1) for t in src])
    n, block = flat_src.numel(), 1024
    for i in range(0, len(averages), _MAX_AVERAGES):
        group = list(averages[i:i + _MAX_AVERAGES])
        rs = [float(r) for r in rates[i:i + _MAX_AVERAGES]]
        k = len(group)
        group += [group[0]] * (_MAX_AVERAGES - k)
        rs += [0.0] * (_MAX_AVERAGES - k)
        _ema_update[(triton.cdiv(n, block),)](flat_src, *group, *rs, n, K=k, BLOCK=block)
