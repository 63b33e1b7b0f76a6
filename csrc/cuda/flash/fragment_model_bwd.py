"""Lane-level numpy model of flash_bwd_kernel.h (dK/dV kernel with the atomic dQ
phase, and the deterministic dQ kernel), used to check the backward's fragment
and index math without a GPU.

ldmatrix / mma come from fragment_model.py (PTX ISA fragment tables); the
kernel's lane-address patterns (LaneAddr), padded smem layouts, tile ranges,
masks, phases 1-3 and epilogues are transliterated, one warp at a time. The
result is compared with autograd through tfkernels.reference in float64
(including a gradient through lse). Kept by hand in sync with the kernel; slow
(pure Python), small shapes:

    python csrc/cuda/flash/fragment_model_bwd.py
"""
import math
import os
import sys

import numpy as np
import torch

import importlib.util
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
# tfkernels.reference is pure PyTorch: load it by path so that no compiled
# extension is needed (this model runs where the package is not built).
_spec = importlib.util.spec_from_file_location(
    "tfkernels.reference", os.path.join(_HERE, "..", "..", "..", "tfkernels", "reference.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)
if "tfkernels" not in sys.modules:
    _pkg = types.ModuleType("tfkernels")
    _pkg.reference = reference
    sys.modules["tfkernels"] = _pkg
    sys.modules["tfkernels.reference"] = reference
sys.path.insert(0, _HERE)
from fragment_model import LANES, ldmatrix_x4, mma, rnd  # noqa: E402

M = N = 64  # BwdTraits kBlockM, kBlockN
PS = M + 8  # kPStride
R0 = (LANES % 8) + 8 * ((LANES // 8) % 2)
C0 = 8 * (LANES // 16)
R1 = (LANES % 8) + 8 * (LANES // 16)
C1 = 8 * ((LANES // 8) % 2)
G, TQ = LANES // 4, LANES % 4


def tile(src, row0, rows, limit, S, D):
    t = np.zeros(rows * S)
    for r in range(rows):
        if row0 + r < limit:
            t[r * S: r * S + D] = src[row0 + r, :D]
    return t


def row_stats(lse, delta, m0, Sq):
    l2 = np.full(M, np.inf); dl = np.zeros(M)
    for i in range(M):
        if m0 + i < Sq:
            l2[i] = np.inf if lse[m0 + i] == -np.inf else lse[m0 + i] * math.log2(math.e)
            dl[i] = delta[m0 + i]
    return l2, dl


def phase1(sQ, sdO, sK, sV, l2, dl, sP, sdS, n0, m0, len_k, off, causal, need_mask, sl2, w, S, Dp, dt):
    key_w, q_w = 16 * (w % 4), 32 * (w // 4)
    acc_s = np.zeros((4, 32, 4)); acc_dp = np.zeros((4, 32, 4))
    for kk in range(Dp // 16):
        ak = ldmatrix_x4(sK, (key_w + R0) * S + kk * 16 + C0)
        av = ldmatrix_x4(sV, (key_w + R0) * S + kk * 16 + C0)
        for nt in range(2):
            bb = ldmatrix_x4(sQ, (q_w + nt * 16 + R1) * S + kk * 16 + C1)
            acc_s[2 * nt] = mma(acc_s[2 * nt], ak, bb[0:2]); acc_s[2 * nt + 1] = mma(acc_s[2 * nt + 1], ak, bb[2:4])
            bb = ldmatrix_x4(sdO, (q_w + nt * 16 + R1) * S + kk * 16 + C1)
            acc_dp[2 * nt] = mma(acc_dp[2 * nt], av, bb[0:2]); acc_dp[2 * nt + 1] = mma(acc_dp[2 * nt + 1], av, bb[2:4])
    for nt in range(4):
        for r in range(2):
            kl = key_w + G + 8 * r
            p, ds = [], []
            for c in range(2):
                ql = q_w + nt * 8 + 2 * TQ + c
                with np.errstate(invalid="ignore"):
                    pv = np.exp2(acc_s[nt, :, 2 * r + c] * sl2 - l2[ql])
                if need_mask:
                    key = n0 + kl; q = m0 + ql
                    vis = (key < len_k) & ((not causal) | (key <= q + off))
                    pv = np.where(vis, pv, 0.0)
                p.append(pv); ds.append(pv * (acc_dp[nt, :, 2 * r + c] - dl[ql]))
            idx = kl * PS + q_w + nt * 8 + 2 * TQ
            if sP is not None:
                sP[idx] = rnd(p[0], dt); sP[idx + 1] = rnd(p[1], dt)
            sdS[idx] = rnd(ds[0], dt); sdS[idx + 1] = rnd(ds[1], dt)


def phase2(sQ, sdO, sP, sdS, acc_dk, acc_dv, w, S, Dp):
    key_w, d_w = 16 * (w % 4), (w // 4) * (Dp // 2)
    for kk in range(M // 16):
        ap = ldmatrix_x4(sP, (key_w + R0) * PS + kk * 16 + C0)
        ads = ldmatrix_x4(sdS, (key_w + R0) * PS + kk * 16 + C0)
        for d2 in range(Dp // 32):
            bb = ldmatrix_x4(sdO, (kk * 16 + R0) * S + d_w + d2 * 16 + C0, trans=True)
            acc_dv[2 * d2] = mma(acc_dv[2 * d2], ap, bb[0:2]); acc_dv[2 * d2 + 1] = mma(acc_dv[2 * d2 + 1], ap, bb[2:4])
            bb = ldmatrix_x4(sQ, (kk * 16 + R0) * S + d_w + d2 * 16 + C0, trans=True)
            acc_dk[2 * d2] = mma(acc_dk[2 * d2], ads, bb[0:2]); acc_dk[2 * d2 + 1] = mma(acc_dk[2 * d2 + 1], ads, bb[2:4])


def phase3(sdS, sK, acc, d0, w, S):
    q_w = 16 * (w % 4)
    for kk in range(N // 16):
        a = ldmatrix_x4(sdS, (kk * 16 + R1) * PS + q_w + C1, trans=True)
        for d2 in range(len(acc) // 2):
            bb = ldmatrix_x4(sK, (kk * 16 + R0) * S + d0 + d2 * 16 + C0, trans=True)
            acc[2 * d2] = mma(acc[2 * d2], a, bb[0:2]); acc[2 * d2 + 1] = mma(acc[2 * d2 + 1], a, bb[2:4])


def run(q, k, v, do, lse, delta, Dp, causal, br, lens, scale, deterministic):
    B, H, Sq, D = q.shape; Hkv, Sk = k.shape[1], k.shape[2]
    grp = H // Hkv
    dt = q.dtype
    S = Dp + 8
    kNT = Dp // 16
    sl2 = scale * math.log2(math.e)
    dq_acc = np.zeros((B, H, Sq, D))
    dq = np.full((B, H, Sq, D), np.nan); dk = np.full((B, Hkv, Sk, D), np.nan); dv = np.full((B, Hkv, Sk, D), np.nan)
    f = lambda t: t.float().numpy()
    for b in range(B):
        len_k = Sk if lens is None else max(0, min(int(lens[b]), Sk))
        off = len_k - Sq if br else 0
        # ---- flash_bwd_dkdv_kernel
        for kvh in range(Hkv):
            ks, vs = f(k[b, kvh]), f(v[b, kvh])
            for nb in range((Sk + N - 1) // N):
                n0 = nb * N
                m_tiles = (Sq + M - 1) // M
                m_begin = 0
                if causal:
                    first_q = n0 - off
                    m_begin = 0 if first_q <= 0 else (m_tiles if first_q >= Sq else first_q // M)
                n_m = m_tiles - m_begin if (n0 < len_k and m_begin < m_tiles) else 0
                acc_dk = np.zeros((8, kNT, 32, 4)); acc_dv = np.zeros((8, kNT, 32, 4))
                sK = tile(ks, n0, N, len_k, S, D); sV = tile(vs, n0, N, len_k, S, D)
                for it in range(n_m * grp):
                    h = kvh * grp + it // n_m; m0 = (m_begin + it % n_m) * M
                    sQ = tile(f(q[b, h]), m0, M, Sq, S, D); sdO = tile(f(do[b, h]), m0, M, Sq, S, D)
                    l2, dl = row_stats(lse[b, h], delta[b, h], m0, Sq)
                    need = (n0 + N > len_k) or (causal and n0 + N - 1 > m0 + off)
                    sP = np.zeros(N * PS); sdS = np.zeros(N * PS)
                    for w in range(8):
                        phase1(sQ, sdO, sK, sV, l2, dl, sP, sdS, n0, m0, len_k, off, causal, need, sl2, w, S, Dp, dt)
                    for w in range(8):
                        phase2(sQ, sdO, sP, sdS, acc_dk[w], acc_dv[w], w, S, Dp)
                    if not deterministic:
                        chunk = 4 if kNT % 4 == 0 else 2
                        for w in range(8):
                            d_w = (w // 4) * (Dp // 2); q_w = 16 * (w % 4)
                            for c in range(kNT // chunk):
                                acc = np.zeros((chunk, 32, 4)); dc = d_w + c * chunk * 8
                                phase3(sdS, sK, acc, dc, w, S)
                                for nt in range(chunk):
                                    for j in range(4):
                                        row = m0 + q_w + G + 8 * (j // 2); col = dc + nt * 8 + 2 * TQ + (j % 2)
                                        for t in range(32):
                                            if row[t] < Sq and col[t] < D:
                                                dq_acc[b, h, row[t], col[t]] += acc[nt, t, j]
                for w in range(8):
                    d_w = (w // 4) * (Dp // 2)
                    for r in range(2):
                        key = n0 + 16 * (w % 4) + G + 8 * r
                        for nt in range(kNT):
                            for c in range(2):
                                col = d_w + nt * 8 + 2 * TQ + c
                                for t in range(32):
                                    if key[t] < Sk and col[t] < D:
                                        dk[b, kvh, key[t], col[t]] = rnd(acc_dk[w, nt, t, 2 * r + c] * scale, dt)
                                        dv[b, kvh, key[t], col[t]] = rnd(acc_dv[w, nt, t, 2 * r + c], dt)
        # ---- flash_bwd_dq_kernel (deterministic) or the convert pass
        for h in range(H):
            if not deterministic:
                dq[b, h] = rnd(dq_acc[b, h] * scale, dt)
                continue
            kvh = h // grp
            ks, vs = f(k[b, kvh]), f(v[b, kvh])
            for mb in range((Sq + M - 1) // M):
                m0 = mb * M
                row_end = min(m0 + M, Sq)
                key_end = min(len_k, row_end + off) if causal else len_k
                n_tiles = (key_end + N - 1) // N if key_end > 0 else 0
                acc = np.zeros((8, kNT, 32, 4))
                sQ = tile(f(q[b, h]), m0, M, Sq, S, D); sdO = tile(f(do[b, h]), m0, M, Sq, S, D)
                l2, dl = row_stats(lse[b, h], delta[b, h], m0, Sq)
                for it in range(n_tiles):
                    n0 = it * N
                    sK = tile(ks, n0, N, len_k, S, D); sV = tile(vs, n0, N, len_k, S, D)
                    need = (n0 + N > len_k) or (causal and n0 + N - 1 > m0 + off)
                    sdS = np.zeros(N * PS)
                    for w in range(8):
                        phase1(sQ, sdO, sK, sV, l2, dl, None, sdS, n0, m0, len_k, off, causal, need, sl2, w, S, Dp, dt)
                    for w in range(8):
                        phase3(sdS, sK, acc[w], (w // 4) * (Dp // 2), w, S)
                for w in range(8):
                    d_w = (w // 4) * (Dp // 2)
                    for r in range(2):
                        row = m0 + 16 * (w % 4) + G + 8 * r
                        for nt in range(kNT):
                            for c in range(2):
                                col = d_w + nt * 8 + 2 * TQ + c
                                for t in range(32):
                                    if row[t] < Sq and col[t] < D:
                                        dq[b, h, row[t], col[t]] = rnd(acc[w, nt, t, 2 * r + c] * scale, dt)
    return torch.tensor(dq), torch.tensor(dk), torch.tensor(dv)


def run_fp32(q, k, v, do, lse, delta, causal, br, lens, scale):
    """flash_bwd_fp32.cu, one block at a time, vectorised over the 32 lanes (the
    column of each lane) and the warp's 4 rows; float64 arithmetic."""
    B, H, Sq, D = q.shape; Hkv, Sk = k.shape[1], k.shape[2]
    grp = H // Hkv
    R, C = 16, 32
    dq = np.full((B, H, Sq, D), np.nan); dk = np.full((B, Hkv, Sk, D), np.nan); dv = np.full((B, Hkv, Sk, D), np.nan)
    f = lambda t: t.double().numpy()
    for b in range(B):
        len_k = Sk if lens is None else max(0, min(int(lens[b]), Sk))
        off = len_k - Sq if br else 0
        for key_rows in (False, True):
            heads_r = Hkv if key_rows else H
            n_rows = Sk if key_rows else Sq
            for hr in range(heads_r):
                kvh = hr if key_rows else hr // grp
                for blk in range((n_rows + R - 1) // R):
                    r0 = blk * R
                    if key_rows:
                        c_tiles = (Sq + C - 1) // C
                        c_begin = 0
                        if causal:
                            fq = r0 - off
                            c_begin = 0 if fq <= 0 else (c_tiles if fq >= Sq else fq // C)
                        n_ct = c_tiles - c_begin if (r0 < len_k and c_begin < c_tiles) else 0
                        n_iter = n_ct * grp
                    else:
                        row_end = min(r0 + R, Sq)
                        key_end = min(len_k, row_end + off) if causal else len_k
                        n_iter = (key_end + C - 1) // C if key_end > 0 else 0
                    row_limit = len_k if key_rows else Sq
                    X = f(k[b, kvh]) if key_rows else f(q[b, hr]); Y = f(v[b, kvh]) if key_rows else f(do[b, hr])
                    sXr = np.zeros((R, D)); sYr = np.zeros((R, D))
                    for r in range(R):
                        if r0 + r < row_limit:
                            sXr[r] = X[r0 + r]; sYr[r] = Y[r0 + r]
                    rows = r0 + np.arange(R)
                    lse_r = np.full(R, -np.inf); dl_r = np.zeros(R)
                    if not key_rows:
                        ok = rows < Sq
                        lse_r[ok] = lse[b, hr, rows[ok]]; dl_r[ok] = delta[b, hr, rows[ok]]
                    acc0 = np.zeros((R, D)); acc1 = np.zeros((R, D))
                    for it in range(n_iter):
                        head = kvh * grp + it // n_ct if key_rows else hr
                        c0 = (c_begin + it % n_ct) * C if key_rows else it * C
                        Xc = f(q[b, head]) if key_rows else f(k[b, kvh]); Yc = f(do[b, head]) if key_rows else f(v[b, kvh])
                        col_limit = Sq if key_rows else len_k
                        sXc = np.zeros((C, D)); sYc = np.zeros((C, D))
                        cols = c0 + np.arange(C)
                        for j in range(C):
                            if cols[j] < col_limit:
                                sXc[j] = Xc[cols[j]]; sYc[j] = Yc[cols[j]]
                        sL = np.full(C, -np.inf); sD = np.zeros(C)
                        if key_rows:
                            ok = cols < Sq
                            sL[ok] = lse[b, head, cols[ok]]; sD[ok] = delta[b, head, cols[ok]]
                        s = sXr @ sXc.T; dp = sYr @ sYc.T  # [R, C]
                        key = rows[:, None] if key_rows else cols[None, :]
                        qq = cols[None, :] if key_rows else rows[:, None]
                        L = sL[None, :] if key_rows else lse_r[:, None]
                        Dl = sD[None, :] if key_rows else dl_r[:, None]
                        vis = (key < len_k) & (qq < Sq) & ((not causal) | (key <= qq + off)) & (L != -np.inf)
                        with np.errstate(invalid="ignore", over="ignore"):
                            p = np.where(vis, np.exp(np.where(vis, s * scale - L, 0.0)), 0.0)
                        ds = p * (dp - Dl)
                        here = min(col_limit - c0, C)
                        acc0 += ds[:, :here] @ sXc[:here]
                        if key_rows:
                            acc1 += p[:, :here] @ sYc[:here]
                    for r in range(R):
                        row = r0 + r
                        if row >= n_rows:
                            break
                        if key_rows:
                            dk[b, hr, row] = acc0[r] * scale; dv[b, hr, row] = acc1[r]
                        else:
                            dq[b, hr, row] = acc0[r] * scale
    return torch.tensor(dq), torch.tensor(dk), torch.tensor(dv)


def check(B, H, Hkv, Sq, Sk, D, causal, br, lens, dt=torch.float16, scale=None, deterministic=False, glse=False):
    torch.manual_seed(0)
    q = torch.randn(B, H, Sq, D).to(dt); k = torch.randn(B, Hkv, Sk, D).to(dt); v = torch.randn(B, Hkv, Sk, D).to(dt)
    do = torch.randn(B, H, Sq, D).to(dt)
    sc = scale if scale is not None else 1 / math.sqrt(D)
    Dp = 32 if D <= 32 else (D + 31) // 32 * 32
    lt = None if lens is None else torch.tensor(lens)
    kw = dict(is_causal=causal, causal_alignment="bottom_right" if br else "top_left", scale=sc, seqlens_k=lt)
    hi = [t.double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.flash_attention(*hi, return_lse=True, **kw)
    g_lse = torch.randn_like(lse) if glse else None
    loss = (out * do.double()).sum()
    if glse:
        loss = loss + (torch.where(torch.isinf(lse), torch.zeros_like(lse), lse) * g_lse).sum()
    ref = torch.autograd.grad(loss, hi)
    o_low = out.detach().to(dt).double()
    delta = (o_low * do.double()).sum(-1)
    if glse:
        delta = delta - g_lse
    if dt == torch.float32:
        dq, dk, dv = run_fp32(q, k, v, do, lse.detach().double().numpy(), delta.numpy(), causal, br, lens, sc)
    else:
        dq, dk, dv = run(q, k, v, do, lse.detach().numpy(), delta.numpy(), Dp, causal, br, lens, sc, deterministic)
    errs = []
    for name, a, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert not torch.isnan(a).any(), f"NaN in {name}"
        mag = max(r.abs().max().item(), 1e-3)
        errs.append((a - r).abs().max().item() / mag)
    print(f"B{B} H{H}/{Hkv} Sq{Sq} Sk{Sk} D{D}(pad {Dp}) causal={causal} br={br} lens={lens} det={deterministic} "
          f"glse={glse}: rel err dq {errs[0]:.1e} dk {errs[1]:.1e} dv {errs[2]:.1e}")
    assert max(errs) < (1e-5 if dt == torch.float32 else 2e-2)


if __name__ == "__main__":
    check(1, 1, 1, 20, 37, 40, False, False, None)
    check(1, 2, 1, 70, 90, 32, True, False, None, deterministic=True)
    check(1, 2, 1, 70, 90, 32, True, False, None)
    check(1, 1, 1, 80, 30, 64, True, True, None, glse=True)             # fully masked rows, grad through lse
    check(2, 3, 1, 17, 100, 59, True, True, [0, 70], deterministic=True)  # lens 0, odd D, GQA
    check(1, 1, 1, 65, 66, 96, False, False, None, dt=torch.bfloat16, scale=-0.3)
    check(1, 1, 1, 40, 70, 160, True, False, [50], deterministic=True)
    check(1, 2, 1, 130, 150, 256, True, True, None, dt=torch.bfloat16)  # chunk 4 of 16 n8 tiles, 3 query tiles
    check(1, 1, 1, 100, 130, 224, True, False, None, deterministic=True)  # 14 n8 tiles
    check(1, 1, 1, 140, 129, 128, False, False, None, glse=True)
    # fp32 SIMT kernels (flash_bwd_fp32.cu)
    check(2, 3, 1, 50, 70, 59, True, True, [0, 45], dt=torch.float32, glse=True)
    check(1, 2, 2, 90, 40, 40, True, False, None, dt=torch.float32)
    check(1, 2, 1, 33, 100, 256, False, False, [77], dt=torch.float32)
