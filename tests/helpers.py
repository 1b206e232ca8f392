"""Small pieces several test files share."""
import importlib.util
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tritonrun.gpt2.ops import interpreter_problem

HAS_CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parent.parent


def load_script(relpath: str, name: str):
    """A script of the repo (bench/*.py, sample.py) loaded by path as module `name`, executed afresh. Not
    imported by name: with bench/ on sys.path, `import kernels` would find bench/kernels.py. Registered in
    sys.modules before it runs: dataclasses look their module up while it executes."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shared_across_workers(request, name: str, compute):
    """`compute(directory)` run once per pytest session, its (picklable) result shared by every xdist worker.

    Under pytest-xdist a module- or session-scoped fixture is built once per worker that runs one of its tests;
    for the expensive ones (a cold compile of every kernel, a bench smoke run) that doubles the cost on two cores.
    Here the first worker to ask computes while holding a lock in the directory all workers of the session share
    (the parent of their base temp dirs); the others wait on the lock, then load the pickled result. `directory`
    is a fresh folder that lives as long as the session's temp dir, so files the result names (a record, a plot)
    are there for every worker: treat them as read-only. If `compute` raises (or skips), nothing is stored and the
    next worker that asks computes again: each reports the error itself. Without xdist (-n 0) it simply computes.
    `request` is the calling fixture's; `name` must be unique per computation in the session."""
    tmp_path_factory = request.getfixturevalue("tmp_path_factory")
    if not hasattr(request.config, "workerinput"):  # not an xdist worker (what xdist's worker_id fixture checks)
        return compute(tmp_path_factory.mktemp(name))
    from filelock import FileLock  # torch's own dependency (and huggingface-hub's): always installed with them

    root = tmp_path_factory.getbasetemp().parent  # <session basetemp>, parent of each worker's popen-gwN
    result = root / f"shared-{name}.pickle"
    with FileLock(str(root / f"shared-{name}.lock")):
        if result.exists():
            return pickle.loads(result.read_bytes())
        directory = root / f"shared-{name}"
        shutil.rmtree(directory, ignore_errors=True)  # what an earlier worker's failed attempt left
        directory.mkdir()
        value = compute(directory)
        partial = result.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(value))
        partial.replace(result)
        return value


INTERPRETER_PROBLEM = interpreter_problem()
# Tests that run the Triton backend on CPU in a subprocess (--gpu cpu), also on CUDA machines. Without CUDA
# conftest already stops the whole session with the fix when the interpreter cannot run.
NEEDS_INTERPRETER = pytest.mark.skipif(INTERPRETER_PROBLEM is not None,
                                       reason=f"Triton's CPU interpreter cannot run here: {INTERPRETER_PROBLEM}")

# (dtype, floor) for elementwise / row-reduction kernels checked with the low-precision rule. bf16 runs on CPU too:
# these kernels load bf16, compute in fp32 and round at the store, which the Triton interpreter does right (only
# its bf16 tl.dot is wrong: the dot-based kernels' bf16 cases need a GPU and say so). The rule
# max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor * max|ref|. Floors: one ulp at the top
# magnitude for fp16 (2^-10) and bf16 (2^-7), because torch's worst error can land on a small element
# while one rounding of ours lands on the largest; 8 ulps (2^-20) for fp32, where a different
# accumulation order costs a few ulps either way (still ~1e-6 relative: tight).
ELEMENTWISE_DTYPES = [
    pytest.param(torch.float32, 2.0**-20, id="fp32"),
    pytest.param(torch.float16, 2.0**-10, id="fp16"),
    pytest.param(torch.bfloat16, 2.0**-7, id="bf16"),
]



def one_thread_env(drop=()) -> dict:
    """The environment for a CLI subprocess: this one's, minus `drop`, with one intra-op thread.
    The models in the CLI tests are tiny, so one thread is fastest and immune to oversubscribed shared CPUs
    (where OpenMP barriers can make a microsecond op take milliseconds). It is also what makes two runs
    bitwise comparable on any CPU: with two threads, CI once saw a step's grad norm differ in the 7th digit
    between two identical runs (MKL/OpenMP split work, and so the summation order, by thread)."""
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


ONE_THREAD_ENV = one_thread_env()


def poison_allocations(monkeypatch, module) -> None:
    """Make `module._alloc` (the launchers' allocator) hand out NaN-filled buffers: an element a kernel
    forgets to write stays NaN and fails the comparison."""
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_alloc", nan_alloc)


def tiny_speedrun(seed: int = 0, block_size: int = 64, dense: bool = False):
    """A tiny SpeedrunGPT (tritonrun/gpt2/speedrun.py: the 12-17 windowed model, or with dense the 11-10 one) on the
    real GPT-2 vocabulary (sample.py checks it against the
    tokenizer; HellaSwag endings use any of its tokens), with random weights where the record zero-inits
    (projections, lm_head), so its logits depend on every layer and its text is not one repeated token."""
    import dataclasses
    import math

    from tritonrun.gpt2.speedrun import SPEEDRUN_DENSE_MODELS, SPEEDRUN_MODELS, SpeedrunGPT

    torch.manual_seed(seed)
    sizes = SPEEDRUN_DENSE_MODELS if dense else SPEEDRUN_MODELS
    model = SpeedrunGPT(dataclasses.replace(sizes["tiny"], block_size=block_size))
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                module.weight.normal_(0.0, 2.0 / math.sqrt(module.weight.shape[1]))
        model.lm_head.weight[model.config.vocab_size:].zero_()
    return model.eval()


def save_speedrun_checkpoint(out_dir, step: int, model) -> Path:
    """A checkpoint as a --recipe speedrun / speedrun-dense run writes its model: model_kind (the config's recipe)
    + SpeedrunConfig dict."""
    from tritonrun.gpt2.checkpoint import save_checkpoint

    return save_checkpoint(out_dir, step, {"model_kind": model.config.recipe, "model_config": model.config.to_dict(),
                                           "model": model.state_dict()})


def random_hellaswag_examples(n: int, seed: int = 0) -> list:
    """n HellaSwag examples of random token ids (a 5-token context, 4 endings of 1-4 tokens, a random label): enough
    to drive the trainer's HellaSwag call on any model."""
    import numpy as np

    from tritonrun.data.hellaswag import Example

    rng = np.random.default_rng(seed)
    return [Example.of(rng.integers(0, 50257, 5).tolist(),
                       [rng.integers(0, 50257, 1 + k).tolist() for k in range(4)], int(rng.integers(4)))
            for _ in range(n)]


def assert_same_numbers(got: list[float], want: list[float], recorded: dict, rel: float = 1e-4) -> None:
    """`got` (losses, norms: floats a run computed here) against `want`, recorded by an earlier version of the code on
    the machine `recorded` describes ("torch", "cpu_capability"). Bitwise where this machine's torch and CPU SIMD
    path are the recording's: the same fp32 operations in the same order give the same bits. Elsewhere rounding may
    differ; `rel` bounds what a few ulps per op can grow to over the caller's few optimizer steps."""
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    if here == (recorded["torch"], recorded["cpu_capability"]):
        assert got == want
    else:
        assert got == pytest.approx(want, rel=rel)


def hellaswag_by_hand(model, examples) -> dict:
    """HellaSwag acc / acc_norm scored independently of tritonrun.data.hellaswag: one ending at a time, context +
    ending alone through the model (no batching, no padding, fp32, eval mode), the ending tokens' cross-entropy
    summed (acc) and averaged (acc_norm), the lowest picked."""
    import numpy as np
    import torch.nn.functional as F

    was = model.training
    model.eval()
    right = right_norm = 0
    with torch.no_grad():
        for ex in examples:
            sums, means = [], []
            for end in ex.endings:
                ids = torch.from_numpy(np.concatenate([ex.ctx, end]))[None]
                logits = model(ids)[0, :-1].float()  # position p predicts token p + 1
                ce = F.cross_entropy(logits[-len(end):], ids[0, -len(end):], reduction="none")
                sums.append(ce.sum().item())
                means.append(ce.mean().item())
            right += int(np.argmin(sums) == ex.label)
            right_norm += int(np.argmin(means) == ex.label)
    model.train(was)
    return {"acc": right / len(examples), "acc_norm": right_norm / len(examples), "n": len(examples)}
