"""Ahead-of-time resource checks shared by the kernel files' fit tests and bench/ada.py.

Triton compiles for any NVIDIA arch without a GPU; these helpers read what the compiled kernel costs:
registers and spills from `ptxas -v` (the ptxas bundled with triton, run with Triton's own flags) and
the tensor-core instructions in the PTX. Not an op: no kernels live here.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync\.aligned)(?:\.\w+)+")


def mma_instructions(ptx: str) -> list[str]:
    """The distinct tensor-core instructions (mma.sync / wgmma) in a PTX listing, sorted."""
    return sorted(set(MMA.findall(ptx)))


def ptxas_info(cc: int) -> tuple[str | None, str | None]:
    """(path, version) of the ptxas Triton uses for compute capability `cc`; (None, None) if absent."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(cc)
    except Exception:  # noqa: BLE001 - a missing binary is reported by the callers, not fatal here
        return None, None
    return (ptxas.path, ptxas.version) if ptxas.path and os.path.exists(ptxas.path) else (None, None)


def ptxas_stats(ptx: str, cc: int, fp_fusion: bool = True) -> dict:
    """{"registers", "spill_stores", "spill_loads"} from `ptxas -v`, run as Triton's make_cubin runs it;
    all None when no ptxas is bundled. RuntimeError if ptxas rejects the PTX."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    path, _ = ptxas_info(cc)
    if path is None:
        return {"registers": None, "spill_stores": None, "spill_loads": None}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(tmp, "k.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed ({' '.join(cmd)}): {out.stderr.strip()[-2000:]}")
    log = out.stderr + out.stdout
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_stores": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "spill_loads": int(re.search(r"(\d+) bytes spill loads", log).group(1))}


def cached_ptxas_stats(kernel, cc: int, fp_fusion: bool = True) -> dict:
    """ptxas_stats of a compiled kernel (triton.compile's result), cached beside it in Triton's cache: the
    same kernel hash means the same PTX and options, so the numbers cannot go stale. Not cached when no
    ptxas is bundled (all None)."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(kernel.hash)
    name = "tritonrun_ptxas.json"
    cached = cache.get_file(name)
    if cached is not None:
        with open(cached) as f:
            return json.load(f)
    stats = ptxas_stats(kernel.asm["ptx"], cc, fp_fusion)
    if stats["registers"] is not None:
        cache.put(json.dumps(stats), name, binary=False)
    return stats
