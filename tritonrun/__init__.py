"""tritonrun: hand-written Triton kernels for GPT-2 training, a faithful GPT-2 and the speedrun models, and the
trainer that runs them.

  tritonrun.kernels   one Triton op per file, each a torch custom op with autograd and a plain-PyTorch reference
  tritonrun.gpt2      the models, their configs, the ops seam (torch or Triton per op), checkpoints, HF interop
  tritonrun.data      offline GPT-2 tokenizer, llm.c token shards, loaders, FineWeb and HellaSwag
  tritonrun.train     the `python train_speedrun.py` command line; tritonrun.training, its loop

Importing the package imports nothing else: `import tritonrun.kernels.attention` loads Triton and that op only.
"""
