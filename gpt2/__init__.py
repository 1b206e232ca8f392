"""GPT-2: config, model and the ops seam that picks torch or Triton per op."""
from gpt2.config import GPTConfig, MODEL_SIZES
from gpt2.model import GPT

__all__ = ["GPT", "GPTConfig", "MODEL_SIZES"]
