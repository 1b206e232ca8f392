"""Hand-written Triton kernels, one op per file. tritonrun/gpt2/ops.py imports each lazily and falls back to
PyTorch for any kernel that has not landed; see its docstring for the signatures a kernel must match."""
