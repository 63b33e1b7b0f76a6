"""Comparison rules shared by the tests (see docs/ARCHITECTURE.md, Conventions)."""
import contextlib

import torch

# Float64 results must agree to near round-off of a few reductions.
FLOAT64_TOL = dict(rtol=1e-9, atol=1e-10)


def cpu_flags():
    """The running CPU's feature flags as /proc/cpuinfo names them (empty where it has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def high_precision(t):
    """The dtype the oracle runs in: float64 on the CPU, float32 on the GPU."""
    if t is None:
        return None
    return t.to(torch.float64 if t.device.type == "cpu" else torch.float32)


def max_abs_err(a, b):
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = (a - b).abs().masked_fill(both_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_flash_rule(actual, ref_high, ref_low, name="output", factor=2.0, eps_ulps=1):
    """FlashAttention's rule: the kernel's max error against the high-precision
    reference is at most `factor` x the error of the same reference computed in
    the kernel's dtype, plus an epsilon of the dtype's round-off at the size of
    the values (so an exact low-precision reference does not demand exactness);
    `eps_ulps` widens that epsilon to a few units of round-off where a reference can
    be exact by cancellation that no kernel can reproduce.
    """
    assert actual.shape == ref_high.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref_high.shape)}"
    actual, ref_high, ref_low = actual.detach(), ref_high.detach(), ref_low.detach()
    assert not torch.isnan(actual).any(), f"{name}: contains NaN (unwritten or invalid elements)"
    finite = ref_high[torch.isfinite(ref_high)]
    magnitude = float(finite.abs().max()) if finite.numel() else 1.0
    eps = eps_ulps * torch.finfo(actual.dtype).eps * max(magnitude, 1e-3)
    err = max_abs_err(actual, ref_high)
    ref_err = max_abs_err(ref_low, ref_high)
    bound = factor * ref_err + eps
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x reference error {ref_err:.3e} + eps {eps:.1e}"


def assert_close_float64(actual, expected, name="output"):
    assert not torch.isnan(actual).any(), f"{name}: contains NaN"
    torch.testing.assert_close(actual, expected, **FLOAT64_TOL, msg=lambda m: f"{name}: {m}")


@contextlib.contextmanager
def tf32_matmul(enabled):
    """Sets torch.backends.cuda.matmul.allow_tf32 for the block (the GEMM launchers read it)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def float64_softmax():
    """F.softmax(x, dtype=torch.float32) keeps a float64 x in float64 for the block.

    Hugging Face's eager attention (Llama, Mistral, Gemma 2) takes its softmax in
    float32 even in a float64 model: that makes "eager" a float32-accurate reference,
    and turns its finfo(float64).min mask into -inf, so a row that sees no key gives
    NaN, which reaches the valid rows of the next layer (0 x NaN).
    """
    original = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64 and dtype == torch.float32:
            dtype = None
        return original(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def hf_forward_backward(model, ids, mask, valid, weights):
    """A Hugging Face model's last_hidden_state and every parameter gradient of
    sum(hidden * weights) over the valid (unpadded) query rows."""
    model.zero_grad()
    with float64_softmax():  # eager's float32 softmax would make it the least accurate reference
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden * weights)[valid].sum().backward()  # padded query rows are undefined: keep them out of the loss
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), grads
