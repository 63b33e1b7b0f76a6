"""tfkernels as the flash backend of torch's `F.scaled_dot_product_attention`.

`import tfkernels` registers the name "tfkernels" with torch's flash-attention registry
(`torch.nn.attention.register_flash_attention_impl`, torch 2.9+) and activates nothing,
as torch asks of providers. Then either

    torch.nn.attention.activate_flash_attention_impl("tfkernels")   # until restore_flash_attention_impl()
    with tfkernels.use_as_sdpa_backend():                           # for a block, then back as it was
        ...

replaces torch's kernels behind SDPA's flash path with ours (see `_sdpa_ops` for the
ops and their contracts):
- CUDA: the ops torch's FA4 provider replaces: `_scaled_dot_product_flash_attention`
  and its backward, `_flash_attention_forward` (also `_no_dropout_inplace`) and
  `_flash_attention_backward`. SDPA reaches them when it picks its flash backend
  (fp16/bf16, no attn_mask, no dropout); `varlen_attn` and context parallelism call
  them directly.
- CPU: `_scaled_dot_product_flash_attention_for_cpu` and its backward, which SDPA on the
  CPU calls for every call without dropout whose last dims are contiguous: with or
  without attn_mask (bool or float), enable_gqa, any Sq, head dims beyond 256, 3-D
  inputs (made 4-D first). dropout_p > 0 or a non-contiguous last dim send SDPA to its
  math path, which never reaches us.

A call the kernels cannot serve runs torch's own kernel for that op (the one that ran
before activation), with a one-time RuntimeWarning naming the reason: dropout on the CPU, an
attn_mask other than right key padding and/or causal, an unsupported dtype or head dim,
packed varlen inputs, alibi, paged KV (CUDA's flash ops pass sliding windows and
dropout to the kernels). The mask is read on the CPU
(no device sync) to find its padding lengths; CUDA's flash ops take no mask at all.

`restore_flash_attention_impl()` (or leaving the `with` block) removes our kernels.
Do not switch between a forward and its backward: each side saves what its own
backward expects.
"""
import contextlib
import warnings

import torch

from . import _sdpa_ops

__all__ = ["NAME", "register", "use_as_sdpa_backend", "is_available", "install"]

NAME = "tfkernels"

# aten op -> our adapter, per dispatch key.
_OVERRIDES = {
    "CPU": {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_ops.cpu_forward,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_ops.cpu_backward,
    },
    "CUDA": {
        "_scaled_dot_product_flash_attention": _sdpa_ops.sdpa_flash_forward,
        "_scaled_dot_product_flash_attention_backward": _sdpa_ops.sdpa_flash_backward,
        "_flash_attention_forward": _sdpa_ops.flash_forward,
        "_flash_attention_forward_no_dropout_inplace": _sdpa_ops.flash_forward_inplace,
        "_flash_attention_backward": _sdpa_ops.flash_backward,
    },
}

_warned = set()


def is_available():
    """Whether this torch has the flash-attention registry and the kernel lookup the backend needs."""
    attention = getattr(torch.nn, "attention", None)
    return (attention is not None and hasattr(attention, "register_flash_attention_impl")
            and hasattr(torch.library, "get_kernel"))


def _warn_fallback(op_name, reason):
    # Once per reason: a forward and its backward decline for the same one.
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"tfkernels SDPA backend: aten::{op_name} runs torch's own kernel for this call: {reason}. "
                      "(Shown once per reason.)", RuntimeWarning, stacklevel=2)


def _with_fallback(op_name, dispatch_key, adapter):
    """A dispatcher kernel: our adapter, else the kernel registered before ours."""
    try:
        original = torch.library.get_kernel(f"aten::{op_name}", dispatch_key)
    except RuntimeError:  # this torch build has none (e.g. a CPU-only build has no CUDA kernels)
        original = None

    def kernel(keyset, *args, **kwargs):
        try:
            return adapter(*args, **kwargs)
        except _sdpa_ops.Unsupported as why:
            reason = str(why)
        if original is None:
            raise NotImplementedError(f"tfkernels SDPA backend: aten::{op_name} cannot run this call ({reason}) "
                                      f"and this torch has no {dispatch_key} kernel of its own for it")
        _warn_fallback(op_name, reason)
        return original.call_boxed(keyset, *args, **kwargs)

    return kernel


def install(library, overrides=None):
    """Registers the adapters in `library` (an aten IMPL Library); overrides: {dispatch key: {op: adapter}}."""
    for dispatch_key, ops in (overrides or _OVERRIDES).items():
        for op_name, adapter in ops.items():
            library.impl(op_name, _with_fallback(op_name, dispatch_key, adapter), dispatch_key, with_keyset=True)
    return library


class _Handle:
    """What torch's registry keeps while "tfkernels" is active; remove() unregisters our kernels."""

    def __init__(self, library):
        self.library = library

    def remove(self):
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _activate():
    # torch's registry calls this from activate_flash_attention_impl(NAME), after removing
    # any other provider, so get_kernel sees torch's own kernels.
    return _Handle(install(torch.library.Library("aten", "IMPL")))


def register():
    """Registers NAME with torch's flash-attention registry (done on `import tfkernels`).

    Cheap: nothing is looked up or installed until activation. Returns False, silently,
    when this torch has no registry (older than 2.9).
    """
    if not is_available():
        return False
    torch.nn.attention.register_flash_attention_impl(NAME, register_fn=_activate)
    return True


@contextlib.contextmanager
def use_as_sdpa_backend():
    """SDPA's flash path runs tfkernels inside the block; on exit the previous state returns
    (torch's kernels, or the provider that was active before)."""
    if not is_available():
        raise RuntimeError(f"tfkernels.use_as_sdpa_backend needs torch.nn.attention.register_flash_attention_impl "
                           f"(torch 2.9 or newer); this is torch {torch.__version__}")
    attention = torch.nn.attention
    previous = attention.current_flash_attention_impl()
    if previous == NAME:
        yield
        return
    attention.activate_flash_attention_impl(NAME)
    try:
        yield
    finally:
        if previous is None:
            attention.restore_flash_attention_impl()
        else:
            attention.activate_flash_attention_impl(previous)
