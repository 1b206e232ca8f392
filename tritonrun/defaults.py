"""A run's default values, apart from the hardware (tritonrun/presets.py) and the recipe's own
(tritonrun/recipes/, `Recipe.defaults`): a full FineWeb run on a GPU, a one-minute smoke run on a CPU.

Resolution order (tritonrun/train.py): preset < these < the recipe's defaults < the flags; the micro-batch (dense
recipes) or the packed length (packed recipes) of a GPU run is then derived from the card's memory
(tritonrun.memory.fit_preset) unless a flag gives it.
"""
from __future__ import annotations

from tritonrun.data.fineweb import DEFAULT_OUT_DIR  # the default --data: where tritonrun.data.fineweb writes
from tritonrun.data.hellaswag import DEFAULT_PATH as HELLASWAG_PATH

# --recipe left out: the newest replicated record on a GPU; llm.c's GPT-2 on a CPU (its smoke run is the cheapest)
DEFAULT_RECIPE = {"cuda": "record89", "cpu": "gpt2"}

RUN_DEFAULTS = {
    "model": "d12",
    "data": DEFAULT_OUT_DIR,
    "seq_len": 1024,  # dense recipes' T (packed recipes: derived from memory)
    "total_batch_tokens": 524_288,  # 2**19, llm.c and the speedrun records
    "val_every": 250,
    "val_tokens": 10_485_760,
    "seed": 1337,
    "target_val_loss": 3.28,
    "checkpoint_every": 500,  # steps between checkpoints (0 = none; the end and SIGINT/SIGTERM still write one)
    "keep_checkpoints": 2,  # newest K checkpoints kept (0 = all)
    "final_checkpoint": True,  # a finished run ends with a checkpoint (--no-final-checkpoint: timing runs)
    "max_bad_steps": 3,  # non-finite steps in a row tolerated before the run stops
    "init_from": None,  # hf:PATH, llmc:PATH or ckpt:PATH instead of a fresh init
    "hellaswag_every": 1000,  # HellaSwag eval every N steps and at the end, when the file exists (0 = off)
    "hellaswag_path": str(HELLASWAG_PATH),  # written by `python -m tritonrun.data.hellaswag`
    "torch_ops": "",  # under --backend triton, these ops (comma list, tritonrun/gpt2/ops.py names) stay torch
    "muon_coefficients": "quintic",
    "fp8": "auto",  # FP8 matmuls where the recipe has them (record89): on with --backend triton on sm_89 / sm_90
    "doc_aligned": False,  # packed recipes: contiguous chunks (the 2024-12-17 record's data order); True: BosAlign  # speedrun recipes: Newton-Schulz coefficients (the records', polar_express)
}

# A CPU smoke run: the built-in corpus, the tiny model, 50 steps of 1,024 tokens, no checkpoints on the way, no
# HellaSwag; the dense micro-batch is fixed (a CPU has no memory budget to size it by).
SMOKE_DEFAULTS = {
    **RUN_DEFAULTS,
    "model": "tiny",
    "data": "sample",
    "seq_len": 128,
    "total_batch_tokens": 1024,
    "micro_batch": 4,
    "max_steps": 50,
    "val_every": 25,
    "val_tokens": 8192,
    "checkpoint_every": 0,
    "hellaswag_every": 0,
}


def run_defaults(device: str) -> dict:
    """The defaults of a run on `device` ("cuda" or "cpu"), before the recipe's."""
    return dict(SMOKE_DEFAULTS if device == "cpu" else RUN_DEFAULTS)
