"""tfkernels: fused transformer kernels for PyTorch.

Functional ops (tfkernels.flash_attention, flash_attention_with_kvcache, merge_attention,
fused_qkv, bias_gelu, linear_gelu, fused_mlp), modules in tfkernels.nn, pure-PyTorch references of every op
in tfkernels.reference, and the SDPA backend (tfkernels.sdpa_backend): importing
registers "tfkernels" with torch.nn.attention's flash-attention registry, activating
nothing; use_as_sdpa_backend() or activate_flash_attention_impl("tfkernels") turns it on.
"""
import torch

try:
    from . import _C
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        f"tfkernels: the compiled extension tfkernels._C failed to load ({err}). It must be built against the "
        f"torch that is installed now ({torch.__version__}): reinstall with "
        "`pip install --no-build-isolation .` (see README, Troubleshooting)."
    ) from err

from . import nn, reference, sdpa_backend  # noqa: E402
from .ops import (bias_gelu, flash_attention, flash_attention_with_kvcache, fused_mlp, fused_qkv,  # noqa: E402
                  linear_gelu, merge_attention)
from .sdpa_backend import use_as_sdpa_backend  # noqa: E402

__version__ = "0.1.0"
__all__ = ["flash_attention", "flash_attention_with_kvcache", "merge_attention", "fused_qkv", "bias_gelu",
           "linear_gelu", "fused_mlp", "build_info", "use_as_sdpa_backend", "nn", "reference"]


def build_info():
    """How the loaded extension was built.

    Returns a dict: torch_version (the torch it was compiled against), cuda (whether
    CUDA kernels were compiled), cuda_version, cuda_archs (e.g. ["8.0", "9.0a"]),
    and torch_version_now (the torch imported now, which must match).
    """
    info = dict(_C.build_info())
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(";") if a]
    info["torch_version_now"] = torch.__version__
    return info


def _check_torch_abi():
    built = _C.build_info()["torch_version"]
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        import warnings

        warnings.warn(f"tfkernels was built against torch {built} but torch {torch.__version__} is imported; "
                      "rebuild with `pip install --no-build-isolation .` if ops fail to load or crash.",
                      RuntimeWarning, stacklevel=2)


_check_torch_abi()
sdpa_backend.register()

