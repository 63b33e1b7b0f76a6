"""Every tfkernels CUDA op, forward and backward (the KV-cache op: forward), on small odd shapes: the target of
compute-sanitizer (memcheck, racecheck) in tools/device_check.sh. With --tests it
first runs the tests marked `sanitize` (pytest -m "cuda and sanitize") in the same
process, so one sanitizer run (one torch start-up) covers both. Small so that it
runs in seconds under the sanitizer.

    compute-sanitizer --tool memcheck python tools/sanitize_smoke.py --tests

Exits 1 if a marked test fails, or an op raises (other than "no CUDA kernel yet",
which is reported and skipped) or returns non-finite values.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the in-place build in this checkout

import torch  # noqa: E402

import tfkernels  # noqa: E402


def cases():
    dev = "cuda"

    def r(*shape, dtype, scale=1.0, grad=True):
        return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)

    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for causal in (False, True):
                # Odd lengths leave partial tiles; Sq != Sk and GQA (4 heads over 2) exercise the masks.
                q, k, v = r(2, 4, 77, head_dim, dtype=dtype), r(2, 2, 45, head_dim, dtype=dtype), \
                    r(2, 2, 45, head_dim, dtype=dtype)
                yield (f"flash_attention {dtype} D{head_dim} causal={causal}",
                       lambda q=q, k=k, v=v, c=causal: tfkernels.flash_attention(q, k, v, is_causal=c,
                                                                                  causal_alignment="bottom_right"),
                       (q, k, v))
        # Packed sequences of mixed lengths (one empty), GQA, forward and backward.
        cu = torch.tensor([0, 17, 17, 62, 63], dtype=torch.int32, device=dev)
        q, k, v = r(63, 4, 64, dtype=dtype), r(63, 2, 64, dtype=dtype), r(63, 2, 64, dtype=dtype)
        yield (f"flash_attention_varlen {dtype}",
               lambda q=q, k=k, v=v: tfkernels.flash_attention_varlen(q, k, v, cu, cu, 45, 45, is_causal=True),
               (q, k, v))
        # Decoding (inference only): append with rotary into a paged cache (blocks of 16, in
        # shuffled order), then split-KV over the cached rows.
        kc, vc = r(12, 16, 2, 64, dtype=dtype, grad=False), r(12, 16, 2, 64, dtype=dtype, grad=False)
        table = torch.randperm(12, device=dev, dtype=torch.int32).view(2, 6)
        qd, kn, vn = r(2, 1, 4, 64, dtype=dtype, grad=False), r(2, 1, 2, 64, dtype=dtype, grad=False), \
            r(2, 1, 2, 64, dtype=dtype, grad=False)
        angles = torch.arange(96, device=dev, dtype=torch.float32)[:, None] * 0.01 * torch.arange(1, 17, device=dev)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        lens = torch.tensor([40, 95], dtype=torch.int32, device=dev)
        yield (f"flash_attention_with_kvcache {dtype}",
               lambda qd=qd, kc=kc, vc=vc, kn=kn, vn=vn, table=table, cos=cos, sin=sin:
               tfkernels.flash_attention_with_kvcache(qd, kc, vc, k=kn, v=vn, cache_seqlens=lens, block_table=table,
                                                      rotary_cos=cos, rotary_sin=sin, is_causal=True, num_splits=3),
               ())
        x, w, b = r(3, 37, 136, dtype=dtype), r(3 * 2 * 64, 136, dtype=dtype, scale=0.1), r(3 * 2 * 64, dtype=dtype)
        yield f"fused_qkv {dtype}", lambda x=x, w=w, b=b: tfkernels.fused_qkv(x, w, b, num_heads=2), (x, w, b)
        x, b = r(37, 129, dtype=dtype), r(129, dtype=dtype)
        yield f"bias_gelu {dtype}", lambda x=x, b=b: tfkernels.bias_gelu(x, b), (x, b)
        x, w, b = r(37, 72, dtype=dtype), r(136, 72, dtype=dtype, scale=0.1), r(136, dtype=dtype)
        yield f"linear_gelu {dtype}", lambda x=x, w=w, b=b: tfkernels.linear_gelu(x, w, b, approximate="tanh"), (x, w, b)
        w1, b1 = r(200, 72, dtype=dtype, scale=0.1), r(200, dtype=dtype)
        w2, b2 = r(72, 200, dtype=dtype, scale=0.1), r(72, dtype=dtype)
        yield (f"fused_mlp {dtype}", lambda x=x, w1=w1, b1=b1, w2=w2, b2=b2: tfkernels.fused_mlp(x, w1, b1, w2, b2),
               (x, w1, b1, w2, b2))


def main():
    failures = 0
    if "--tests" in sys.argv[1:]:
        import pytest

        code = pytest.main([os.path.join(ROOT, "tests"), "-m", "cuda and sanitize", "-q", "-p", "no:cacheprovider"])
        print(f"sanitize_smoke: tests marked sanitize: pytest exit {int(code)}"
              + (" (none collected)" if int(code) == 5 else ""), flush=True)
        failures += int(code) not in (0, 5)
    if not torch.cuda.is_available():
        print("sanitize_smoke: no CUDA device")
        return 1
    torch.manual_seed(0)
    for name, fn, inputs in cases():
        try:
            out = fn()
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            # Inference-only ops take no inputs to differentiate.
            grads = torch.autograd.grad(outs, inputs, [torch.randn_like(o) for o in outs]) if inputs else ()
            torch.cuda.synchronize()
            bad = [i for i, t in enumerate(outs + list(grads)) if not torch.isfinite(t).all()]
            status = f"non-finite values in outputs/grads {bad}" if bad else "ok"
            failures += bool(bad)
        except NotImplementedError as err:
            status = f"skipped (no CUDA kernel: {str(err).splitlines()[0][:80]})"
        except Exception as err:  # noqa: BLE001 - report every op, then fail
            status = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            failures += 1
        print(f"sanitize_smoke: {name}: {status}", flush=True)
    print(f"sanitize_smoke: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
