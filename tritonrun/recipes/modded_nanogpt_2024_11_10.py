"""--recipe speedrun-dense: modded-nanogpt's 2024-11-10 record (#11, "U-net pattern skip connections & double lr";
records/track_1_short/2024-11-10_UNetDoubleLr, 3000 steps x 524,288 tokens = 1.57B tokens to val 3.2753), the last
dense T = 1024 record. Every hyperparameter is in tritonrun/gpt2/speedrun.py's DENSE_1110 beside its source line:
12 layers of 768, 6 heads of 128, RoPE, QK-norm, ReLU^2, U-net skips, value residual, untied zero-init head,
softcap 30; Adam (0.9, 0.95) on wte 0.6 / head 0.008 / scalars 0.04, Muon 0.04 with momentum 0.85 -> 0.95 over
500 steps; constant lr, then linear to 0 over the last 900 of 3000 steps. Dense (micro_batch, seq_len) batches.
"""
from __future__ import annotations

from dataclasses import dataclass

from tritonrun.gpt2.ops import SPEEDRUN_DENSE_OPS
from tritonrun.gpt2.speedrun import DENSE_RECORD_NAME
from tritonrun.recipes.modded_nanogpt import SpeedrunRecipe


@dataclass(frozen=True)
class Record20241110(SpeedrunRecipe):
    def sizes(self) -> dict:
        from tritonrun.gpt2.speedrun import SPEEDRUN_DENSE_MODELS

        return SPEEDRUN_DENSE_MODELS


RECIPE = Record20241110(name="speedrun-dense", replicates=DENSE_RECORD_NAME, model_kind="speedrun-dense",
                        op_names=SPEEDRUN_DENSE_OPS, tokens_to_target=3000 * 524_288,
                        tokens_source="modded-nanogpt 2024-11-10 record: 3000 steps x 524,288 tokens, val 3.2753; "
                                      "tritonrun/gpt2/speedrun.py")
