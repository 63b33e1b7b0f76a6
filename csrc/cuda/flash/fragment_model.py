"""Lane-level numpy model of flash_fwd_kernel.h, used to check its fragment and
index math without a GPU.

ldmatrix (plain and .trans) and mma.m16n8k16 are implemented from the PTX ISA
fragment tables, independently of the kernel; the kernel's own address formulas
(a_row/a_col, kb_row/kb_col, vb_row/vb_col), padded smem layout, tile bounds,
masking, online softmax and epilogue are transliterated, one warp at a time.
Kept by hand in sync with the kernel; slow (pure Python), for small shapes:

    python csrc/cuda/flash/fragment_model.py
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from tfkernels import reference  # noqa: E402

LANES = np.arange(32)

def ldmatrix_x4(smem, addrs, trans=False):
    # addrs[lane] = element index of row (lane%8) of matrix lane//8
    regs = []
    for m in range(4):
        rows = addrs[8 * m: 8 * m + 8]
        mat = np.stack([smem[a:a + 8] for a in rows])  # 8x8
        if trans:
            mat = mat.T
        t = LANES
        regs.append(np.stack([mat[t // 4, 2 * (t % 4)], mat[t // 4, 2 * (t % 4) + 1]], axis=1))  # [32,2]
    return regs

def mma(d, a, b):
    # a: 4 regs [32,2]; b: 2 regs [32,2]; d: [32,4]
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for t in range(32):
        g, q = t // 4, t % 4
        for i in range(2):
            A[g, 2 * q + i] = a[0][t, i]; A[g + 8, 2 * q + i] = a[1][t, i]
            A[g, 2 * q + 8 + i] = a[2][t, i]; A[g + 8, 2 * q + 8 + i] = a[3][t, i]
            B[2 * q + i, g] = b[0][t, i]; B[2 * q + 8 + i, g] = b[1][t, i]
            C[g, 2 * q + i] = d[t, i]; C[g + 8, 2 * q + i] = d[t, 2 + i]
    C = C + A @ B
    out = np.zeros((32, 4))
    for t in range(32):
        g, q = t // 4, t % 4
        out[t] = [C[g, 2 * q], C[g, 2 * q + 1], C[g + 8, 2 * q], C[g + 8, 2 * q + 1]]
    return out

def rnd(x, dt):  # round to the kernel dtype (pack2)
    return torch.tensor(x, dtype=torch.float32).to(dt).float().numpy()

def run(q, k, v, M, N, D_pad, causal, bottom_right, lens, scale, q_in_regs=True):
    B, H, Sq, D = q.shape; Hkv, Sk = k.shape[1], k.shape[2]
    dt = q.dtype
    S = D_pad + 8
    out = np.full((B, H, Sq, D), np.nan); lse_out = np.full((B, H, Sq), np.nan)
    nw = M // 16
    sl2 = scale * math.log2(math.e)
    for b in range(B):
        len_k = Sk if lens is None else max(0, min(int(lens[b]), Sk))
        off = len_k - Sq if bottom_right else 0
        for h in range(H):
            kh = h // (H // Hkv)
            for mb in range((Sq + M - 1) // M):
                m0 = mb * M
                row_end = min(m0 + M, Sq)
                key_end = min(len_k, row_end + off) if causal else len_k
                n_tiles = (key_end + N - 1) // N if key_end > 0 else 0
                def tile(src, row0, rows, limit):
                    t = np.zeros(rows * S)
                    for r in range(rows):
                        if row0 + r < limit:
                            t[r * S: r * S + D] = src[row0 + r, :D]
                    return t
                qs = q[b, h].float().numpy(); ks = k[b, kh].float().numpy(); vs = v[b, kh].float().numpy()
                sQ = tile(qs, m0, M, Sq)
                for w in range(nw):
                    m0w = m0 + 16 * w
                    if m0w >= Sq: continue
                    acc_o = np.zeros((D_pad // 8, 32, 4)); rmax = np.full((32, 2), -np.inf); rsum = np.zeros((32, 2))
                    g, tq = LANES // 4, LANES % 4
                    a_row = (LANES % 8) + 8 * ((LANES // 8) % 2); a_col = 8 * (LANES // 16)
                    kb_row = (LANES % 8) + 8 * (LANES // 16); kb_col = 8 * ((LANES // 8) % 2)
                    vb_row = (LANES % 8) + 8 * ((LANES // 8) % 2); vb_col = 8 * (LANES // 16)
                    qf = [ldmatrix_x4(sQ, (w * 16 + a_row) * S + kk * 16 + a_col) for kk in range(D_pad // 16)]
                    for it in range(n_tiles):
                        n0 = it * N
                        if causal and n0 > m0w + 15 + off: continue
                        sK = tile(ks, n0, N, len_k); sV = tile(vs, n0, N, len_k)
                        acc_s = np.zeros((N // 8, 32, 4))
                        for kk in range(D_pad // 16):
                            for nt in range(N // 16):
                                bb = ldmatrix_x4(sK, (nt * 16 + kb_row) * S + kk * 16 + kb_col)
                                acc_s[2 * nt] = mma(acc_s[2 * nt], qf[kk], bb[0:2])
                                acc_s[2 * nt + 1] = mma(acc_s[2 * nt + 1], qf[kk], bb[2:4])
                        acc_s *= sl2
                        need = (n0 + N > len_k) or (causal and n0 + N - 1 > m0w + off)
                        if need:
                            for nt in range(N // 8):
                                for j in range(4):
                                    col = n0 + nt * 8 + 2 * tq + (j % 2); row = m0w + g + 8 * (j // 2)
                                    vis = (col < len_k) & ((not causal) | (col <= row + off))
                                    acc_s[nt, :, j] = np.where(vis, acc_s[nt, :, j], -np.inf)
                        for r in range(2):
                            mx = rmax[:, r].copy()
                            for nt in range(N // 8):
                                mx = np.maximum(mx, np.maximum(acc_s[nt, :, 2 * r], acc_s[nt, :, 2 * r + 1]))
                            mx = mx.reshape(8, 4).max(1).repeat(4)
                            m_use = np.where(mx == -np.inf, 0.0, mx)
                            alpha = np.exp2(rmax[:, r] - m_use)
                            rmax[:, r] = mx
                            s = np.zeros(32)
                            for nt in range(N // 8):
                                acc_s[nt, :, 2 * r] = np.exp2(acc_s[nt, :, 2 * r] - m_use)
                                acc_s[nt, :, 2 * r + 1] = np.exp2(acc_s[nt, :, 2 * r + 1] - m_use)
                                s += acc_s[nt, :, 2 * r] + acc_s[nt, :, 2 * r + 1]
                            rsum[:, r] = rsum[:, r] * alpha + s
                            acc_o[:, :, 2 * r] *= alpha; acc_o[:, :, 2 * r + 1] *= alpha
                        for kk in range(N // 16):
                            pa = [rnd(np.stack([acc_s[2 * kk, :, 0], acc_s[2 * kk, :, 1]], 1), dt),
                                  rnd(np.stack([acc_s[2 * kk, :, 2], acc_s[2 * kk, :, 3]], 1), dt),
                                  rnd(np.stack([acc_s[2 * kk + 1, :, 0], acc_s[2 * kk + 1, :, 1]], 1), dt),
                                  rnd(np.stack([acc_s[2 * kk + 1, :, 2], acc_s[2 * kk + 1, :, 3]], 1), dt)]
                            for dtt in range(D_pad // 16):
                                bb = ldmatrix_x4(sV, (kk * 16 + vb_row) * S + dtt * 16 + vb_col, trans=True)
                                acc_o[2 * dtt] = mma(acc_o[2 * dtt], pa, bb[0:2])
                                acc_o[2 * dtt + 1] = mma(acc_o[2 * dtt + 1], pa, bb[2:4])
                    # epilogue
                    stage = np.zeros((16, S))
                    for r in range(2):
                        l = rsum[:, r].reshape(8, 4).sum(1).repeat(4)
                        inv = np.where(l > 0, 1 / np.where(l > 0, l, 1), 0)
                        ls = np.where(l > 0, (rmax[:, r] + np.log2(np.where(l > 0, l, 1))) * math.log(2), -np.inf)
                        for dtt in range(D_pad // 8):
                            stage[g + 8 * r, dtt * 8 + 2 * tq] = rnd(acc_o[dtt, :, 2 * r] * inv, dt)
                            stage[g + 8 * r, dtt * 8 + 2 * tq + 1] = rnd(acc_o[dtt, :, 2 * r + 1] * inv, dt)
                        for t in range(0, 32, 4):
                            row = m0w + t // 4 + 8 * r
                            if row < Sq: lse_out[b, h, row] = ls[t]
                    for rr in range(16):
                        if m0w + rr < Sq: out[b, h, m0w + rr] = stage[rr, :D]
    return torch.tensor(out), torch.tensor(lse_out)

def check(B, H, Hkv, Sq, Sk, D, M, N, causal, br, lens, dt=torch.float16, scale=None):
    torch.manual_seed(0)
    q = torch.randn(B, H, Sq, D).to(dt); k = torch.randn(B, Hkv, Sk, D).to(dt); v = torch.randn(B, Hkv, Sk, D).to(dt)
    sc = scale if scale is not None else 1 / math.sqrt(D)
    Dp = 32 if D <= 32 else (D + 31) // 32 * 32
    lt = None if lens is None else torch.tensor(lens)
    out, lse = run(q, k, v, M, N, Dp, causal, br, lens, sc)
    kw = dict(is_causal=causal, causal_alignment="bottom_right" if br else "top_left", scale=sc, seqlens_k=lt)
    ref, rlse = reference.flash_attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert not torch.isnan(out).any(), "NaN in out"
    err = (out - ref).abs().max().item()
    ninf = torch.isneginf(rlse)
    assert torch.equal(torch.isneginf(lse), ninf)
    lerr = (lse[~ninf] - rlse[~ninf]).abs().max().item() if (~ninf).any() else 0
    print(f"B{B} H{H}/{Hkv} Sq{Sq} Sk{Sk} D{D}(pad {Dp}) M{M} N{N} causal={causal} br={br} lens={lens}: err {err:.2e} lse err {lerr:.2e}")
    assert err < 1e-2 and lerr < 1e-3

if __name__ == "__main__":
    check(1, 1, 1, 20, 37, 40, 32, 16, False, False, None)
    check(1, 2, 1, 33, 50, 32, 32, 32, True, False, None)
    check(1, 1, 1, 40, 20, 64, 32, 16, True, True, None)       # fully masked rows
    check(2, 2, 2, 17, 45, 59, 32, 32, True, True, [0, 30])    # lens 0, odd D
    check(1, 1, 1, 35, 35, 96, 32, 32, False, False, None, dt=torch.bfloat16, scale=-0.3)
    # The real tile shapes (FwdConfig): 128 x 64 (D <= 128) and 128 x 32.
    check(1, 2, 1, 130, 200, 128, 128, 64, True, True, None)
    check(1, 1, 1, 150, 90, 224, 128, 32, True, False, [70])
    check(2, 1, 1, 129, 129, 111, 128, 64, True, True, [129, 5], dt=torch.bfloat16)
