"""CUDA kernels of TVM builds: compiled with nvcc when a library is loaded.

TVM 0.27's wheel embeds the generated CUDA C in an exported library and compiles it when the
library is loaded, through the global hook ``tvm_callback_cuda_compile``. Its own hook needs the
compiler library's target machinery, which a runtime-only install (a deployment machine) does
not have, so graphopt installs a hook that calls nvcc directly for the architecture recorded in
the library's sidecar. This module imports nothing from graphopt, so a deployment script can
load it on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile


def nvcc_path() -> str | None:
    """The nvcc to use: $CUDA_HOME/bin/nvcc, else PATH, else /usr/local/cuda/bin/nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "",
                                                                         "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def compile_cuda_source(code: str, arch: str, *, fmt: str = "fatbin") -> bytes:
    """Compile CUDA C to a fatbin (cubin + PTX) or cubin for ``arch`` (e.g. ``sm_90``) with nvcc."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found: the CUDA kernels of this library are compiled when it is loaded")
    with tempfile.TemporaryDirectory(prefix="graphopt-cuda-") as d:
        src, out = os.path.join(d, "kernels.cu"), os.path.join(d, f"kernels.{fmt}")
        with open(src, "w", encoding="utf-8") as f:
            f.write(code)
        cmd = [nvcc, f"--{fmt}", "-O3", f"-arch={arch}", "-o", out, src]
        if fmt == "fatbin":
            cmd[3:3] = [f"-gencode=arch=compute_{arch[3:]},code=[{arch},compute_{arch[3:]}]"]
            cmd.remove(f"-arch={arch}")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        with open(out, "rb") as f:
            return f.read()


def install_load_hook(arch: str) -> None:
    """Make TVM compile embedded CUDA C for ``arch`` with nvcc when a library is loaded."""
    import tvm_ffi

    def _hook(code: str, *_: object) -> bytes:
        return compile_cuda_source(code, arch)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _hook, override=True)
