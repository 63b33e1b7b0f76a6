"""What every provider module (providers_<family>.py) shares, and the dispatch to them.

A provider is one way to compute an op: tfkernels, a torch peer (SDPA, eager
PyTorch, cuBLASLt, torch.compile) or a ceiling (the GEMMs alone). A suite's module
(providers_<suite>.py, cases.SUITE) has `prepare(case, device) -> Prepared` for
the ops of its suite and raises Skip for a provider the device lacks.
"""
import contextlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cases import SUITE
from settings import DTYPES, first_line


class Skip(Exception):
    """A provider the device lacks, or a case this run leaves out: skipped with its reason."""


@dataclass
class Prepared:
    """A provider ready to time: fn(*inputs) -> tensor or tuple of tensors."""
    fn: object
    make_inputs: object  # () -> tuple of tensors (fresh copy)
    grad_index: tuple = ()  # which inputs get gradients in fwd+bwd
    context: object = field(default=contextlib.nullcontext)
    compiled: bool = False


def prepare(case, device):
    """The Prepared of case.provider for case.op, from providers_<suite>.py."""
    return importlib.import_module(f"providers_{SUITE[case.op]}").prepare(case, device)


def randn(shape, dtype, device, scale=1.0):
    """Normal random values in the case's dtype (a name of settings.DTYPES), times scale."""
    t = torch.randn(shape, dtype=torch.float32, device=device)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(DTYPES[dtype])


def maybe_compile(fn, provider):
    """fn, or torch.compile(fn) for the "compile" provider."""
    if provider != "compile":
        return fn
    torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no dynamic-shape guesses
    return torch.compile(fn, dynamic=False)


def tfkernels_ops():
    """The tfkernels package, or Skip when it does not import (e.g. the build failed)."""
    try:
        import tfkernels
    except Exception as err:  # noqa: BLE001
        raise Skip(f"tfkernels failed to import: {first_line(err)}") from err
    return tfkernels


_reference = None


def reference():
    """tfkernels.reference: the formulas of the eager peers. When the package does not
    import (its extension failed to build), loaded from its file, which needs only torch,
    so that the peers are still measured."""
    global _reference
    if _reference is None:
        try:
            from tfkernels import reference as module
        except ImportError:
            path = Path(__file__).resolve().parent.parent / "tfkernels" / "reference.py"
            spec = importlib.util.spec_from_file_location("tfkernels_reference", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        _reference = module
    return _reference
