"""The compiled part of uba_fused's build: uba_fused._C from csrc/, when nvcc and a CUDA build of torch
are present. The package's metadata is in pyproject.toml.

Install with the torch you already have (no second torch in an isolated build):

    pip install --no-build-isolation -e .      (or `.`)

Environment:
    UBA_FUSED_NO_CUDA=1      skip the extension even where it could be built
    TORCH_CUDA_ARCH_LIST     default "8.0;9.0+PTX": A100 and Hopper (the target), PTX for newer GPUs
    CUDA_HOME                the toolkit root; found from the nvcc on PATH when unset
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def write_registry_header() -> None:
    """csrc/registry.h from uba_fused/registry.py (loaded by path: the package is not importable yet), so
    the kernels are always compiled against the registry Python runs with. Written only when it changed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_uba_fused_registry", os.path.join(ROOT, "uba_fused", "registry.py"))
    registry = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = registry  # dataclasses look the module up while the class is made
    spec.loader.exec_module(registry)
    path = os.path.join(ROOT, "csrc", "registry.h")
    text = registry.cpp_header()
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
        log("wrote csrc/registry.h from uba_fused/registry.py")


def log(msg: str) -> None:
    print(f"uba_fused setup: {msg}", file=sys.stderr, flush=True)


def real_nvcc() -> str | None:
    """The nvcc binary behind the one on PATH, which may be a wrapper script (`exec /real/bin/nvcc "$@"`)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        for target in re.findall(rb"(/\S+/bin/nvcc)\b", head):
            target = target.decode()
            if os.path.isfile(target) and target != nvcc:
                return os.path.realpath(target)
    return nvcc


def find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = real_nvcc()
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def pip_cuda_includes() -> list[str]:
    """Headers torch's CUDA headers include (cusparse.h, cublas_v2.h, ...) that pip's nvidia wheels ship."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(d for d in glob.glob(os.path.join(base, "cu*", "include")) if os.path.isdir(d))
    return dirs


def extensions() -> tuple[list, dict]:
    if os.environ.get("UBA_FUSED_NO_CUDA") == "1":
        log("UBA_FUSED_NO_CUDA=1: installing without the CUDA extension")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        log("no nvcc found: installing the pure-Python package (backends 'torch' and 'triton' only)")
        return [], {}
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            f"uba_fused setup: nvcc is on PATH ({cuda_home}), so this build compiles the CUDA extension against "
            f"torch, but torch cannot be imported here ({exc}). pip builds in an isolated environment unless told "
            "not to: install torch first, then run `pip install --no-build-isolation .` (or `-e .`). To install "
            "without the CUDA extension instead, set UBA_FUSED_NO_CUDA=1.") from None

    if torch.version.cuda is None:
        log(f"torch {torch.__version__} is a CPU build: installing without the CUDA extension")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # read once, when cpp_extension is imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    write_registry_header()
    log(f"building uba_fused._C with CUDA_HOME={cuda_home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        name="uba_fused._C",
        sources=sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        # -fmad=false: each product and sum rounded on its own, as the Triton kernel's (triton.FP_FUSION) and the
        # host build's, so that the kernels write the same bits on a GPU; torch picks the C++ standard
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-fmad=false"]},
    )
    # Searched last, after torch's and the toolkit's own: they only fill the toolkit's gaps. First, pip's
    # copies of cuda_runtime.h & co. would shadow those of the nvcc that compiles, whatever its version.
    ext.include_dirs += pip_cuda_includes()
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)  # everything else: pyproject.toml
