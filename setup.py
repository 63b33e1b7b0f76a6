"""Builds tfkernels._C against the torch this Python imports.

    pip install .                             # the build backend picks the torch (tools/build_backend.py)
    pip install --no-build-isolation .        # build against the torch installed here; or -e . for development

torch is imported only to build the extension: metadata and sdists need none.

Environment:
    TFKERNELS_CUDA=1|0        force the CUDA build on or off (default: on when a
                              CUDA toolkit is found and torch has CUDA)
    TORCH_CUDA_ARCH_LIST      architectures to compile, e.g. "9.0a" (default:
                              the visible GPUs, or "8.0;9.0a" when none is visible)
    TFKERNELS_HEAD_DIMS       restrict the flash-attention head dims compiled,
                              e.g. "64;128", for quick builds (default: all)
    MAX_JOBS                  parallel compile jobs (ninja)
    TFKERNELS_DEBUG_INFO=1    keep the host compiler's -g (off: -g0, see extension())
    CUDA_HOME                 the toolkit root (default: found from nvcc)
"""
import glob
import importlib.metadata
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_from_nvcc(nvcc):
    """The folder whose bin/ holds the real nvcc, seeing through wrapper scripts."""
    nvcc = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(nvcc))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    # A shell wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`.
    try:
        with open(nvcc, "r", errors="ignore") as f:
            text = f.read(4096)
    except OSError:
        return None
    for target in re.findall(r"(/\S+/bin/nvcc)\b", text):
        if os.path.exists(target):
            return _toolkit_root_from_nvcc(target)
    return None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_from_nvcc(nvcc)
        if root:
            return root
    for guess in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(guess, "bin", "nvcc")):
            return guess
    return None


def pip_cuda_include_dirs():
    """Headers that CUDA wheels ship (nvidia/cu13/include holds cusparse.h, cublas)."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(site, pattern))):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    # Only the folders that fill a gap matter; keep the list short and ordered.
    return [d for d in dirs if glob.glob(os.path.join(d, "cusparse.h")) or glob.glob(os.path.join(d, "cublas*.h"))]


# torch.utils.cpp_extension reads CUDA_HOME once, at import, and trusts `which nvcc`,
# which is a wrapper on some machines: settle it before the import.
_cuda_home = find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

# Commands that compile; the others (metadata, sdist) run without torch.
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as err:
    if _BUILD_COMMANDS & set(sys.argv[1:]):
        sys.exit(f"tfkernels: building the extension needs torch, and {sys.executable} cannot import it ({err}). "
                 "Plain `pip install .` (build isolation on) provides the right one; with --no-build-isolation, "
                 "install torch first: `pip install -r requirements/torch.txt`.")
    torch = None


def want_cuda():
    flag = os.environ.get("TFKERNELS_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            sys.exit(f"TFKERNELS_CUDA must be 0 or 1, got {flag!r}")
        if flag == "1" and (not _cuda_home or torch.version.cuda is None):
            sys.exit("TFKERNELS_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME) "
                     f"or torch {torch.__version__} has no CUDA")
        return flag == "1"
    return _cuda_home is not None and torch.version.cuda is not None


def cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        # Hopper gets the arch-specific target so its own instructions are allowed.
        return ";".join(f"{a}.{b}" + ("a" if (a, b) == (9, 0) else "") for a, b in caps)
    return "8.0;9.0a"


def write_build_config(with_cuda, archs):
    """A header the module compiles in, so build_info() reports what this .so really is."""
    out_dir = os.path.join(ROOT, "build", "generated")
    os.makedirs(out_dir, exist_ok=True)
    text = (
        "// Generated by setup.py; do not edit.\n"
        "#pragma once\n"
        f'#define TFKERNELS_BUILT_TORCH_VERSION "{torch.__version__}"\n'
        f"#define TFKERNELS_BUILT_WITH_CUDA {1 if with_cuda else 0}\n"
        f'#define TFKERNELS_BUILT_CUDA_VERSION "{torch.version.cuda if with_cuda else ""}"\n'
        f'#define TFKERNELS_BUILT_CUDA_ARCHS "{archs if with_cuda else ""}"\n'
    )
    path = os.path.join(out_dir, "tfkernels_build_config.h")
    # Rewrite only on change so ninja does not rebuild the module every time.
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return out_dir


def head_dim_filter():
    """TFKERNELS_HEAD_DIMS="64;128" keeps only those instantiation files."""
    spec = os.environ.get("TFKERNELS_HEAD_DIMS", "").replace(",", ";").strip()
    return {int(d) for d in spec.split(";") if d.strip()} if spec else None


def nvcc_flag_list():
    """csrc/cuda/nvcc_flags.txt: the nvcc flags CMakeLists.txt reads too."""
    with open(os.path.join(ROOT, "csrc", "cuda", "nvcc_flags.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def cuda_sources():
    sources = sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True)
                     + glob.glob("csrc/cuda/**/*.cpp", recursive=True))
    dims = head_dim_filter()
    if dims is not None:
        # Instantiation files are named ..._hdim<D>_...; keep only the requested ones.
        def keep(path):
            m = re.search(r"_hdim(\d+)", os.path.basename(path))
            return m is None or int(m.group(1)) in dims
        sources = [s for s in sources if keep(s)]
    return sources


def extension():
    with_cuda = want_cuda()
    archs = cuda_arch_list() if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    config_dir = write_build_config(with_cuda, archs)

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), config_dir]
    # -fno-trapping-math: see csrc/cpu/multiversion.h (the AVX2 clones of the hot loops
    # vectorise only with it). Results are unchanged: nothing here reads FP exception flags.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fopenmp", "-DTFKERNELS_PYTHON_MODULE"]
    # Python's own CFLAGS usually carry -g, which on torch's headers doubles each C++
    # compile (alloc.cpp: 21 s -> 11 s) and makes objects 100x larger; -g0 after it wins.
    if os.environ.get("TFKERNELS_DEBUG_INFO") != "1":
        cxx_flags.append("-g0")
    if not with_cuda:
        return CppExtension("tfkernels._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])

    # Macros go to both compilers explicitly: the launchers (.cpp) and kernels (.cu)
    # must agree on what was compiled.
    macros = ["-DTFKERNELS_WITH_CUDA=1"]
    dims = head_dim_filter()
    if dims is not None:
        macros.append("-DTFKERNELS_HEAD_DIMS_RESTRICTED=1")
        macros += [f"-DTFKERNELS_HAS_HDIM{d}=1" for d in sorted(dims)]
    nvcc_flags = macros + nvcc_flag_list()
    if os.environ.get("TFKERNELS_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    nvcc_threads = os.environ.get("NVCC_THREADS")
    if nvcc_threads:
        nvcc_flags += ["--threads", nvcc_threads]
    include_dirs += pip_cuda_include_dirs()
    return CUDAExtension("tfkernels._C", sources + cuda_sources(), include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags + macros,
                                             "nvcc": nvcc_flags},
                         extra_link_args=["-fopenmp"])


def torch_requirement():
    """The wheel runs only with the torch it was built against (see tools/build_backend.py)."""
    if torch is None:
        return ["torch"]  # an sdist's metadata: its build decides
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = torch.__version__  # a torch without distribution metadata (run from its source tree)
    return [f"torch=={version}"]


# Name, version, packages and extras are in pyproject.toml.
setup(
    install_requires=torch_requirement(),
    ext_modules=[extension()] if torch else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)} if torch else {},
    zip_safe=False,
)
