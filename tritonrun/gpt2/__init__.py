"""GPT-2 and the speedrun model: configs, models and the ops seam that picks torch or Triton per op."""
from tritonrun.gpt2.config import GPTConfig, MODEL_SIZES
from tritonrun.gpt2.model import GPT
from tritonrun.gpt2.speedrun import SPEEDRUN_DENSE_MODELS, SPEEDRUN_MODELS, SpeedrunConfig, SpeedrunGPT

__all__ = ["GPT", "GPTConfig", "MODEL_SIZES", "SPEEDRUN_DENSE_MODELS", "SPEEDRUN_MODELS", "SpeedrunConfig",
           "SpeedrunGPT"]
