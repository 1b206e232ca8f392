"""--recipe speedrun: modded-nanogpt's 2024-12-17 record (#17, "Sparsify value embeddings, improve rotary
embeddings, drop an attn layer"; records/track_1_short/2024-12-17_SparsifyEmbeds, 1490 steps x 524,288 tokens =
0.78B tokens to val 3.2794). Every hyperparameter is in tritonrun/gpt2/speedrun.py's SpeedrunConfig beside its
source line. What this module adds over the shared record recipe (modded_nanogpt.py) is the data layout: each
micro-batch is ONE packed sequence of --seq-len tokens (tritonrun/data/loader.PackedLoader, training sequences start
at document starts, validation reads contiguous windows as the record does), its documents delimited by EOT
(cu_seqlens), and attention over a document-masked sliding window that grows with the step (RecordSchedule.window).
"""
from __future__ import annotations

from dataclasses import dataclass

from tritonrun.gpt2.ops import SPEEDRUN_OPS
from tritonrun.gpt2.speedrun import RECORD_NAME
from tritonrun.recipes.modded_nanogpt import SpeedrunRecipe


@dataclass(frozen=True)
class Record20241217(SpeedrunRecipe):
    packed: bool = True

    def sizes(self) -> dict:
        from tritonrun.gpt2.speedrun import SPEEDRUN_MODELS

        return SPEEDRUN_MODELS

    def defaults(self, on_gpu: bool) -> dict:
        out = super().defaults(on_gpu)
        if not on_gpu:  # the smoke run packs two of the dense smoke's 128-token rows per sequence
            out["seq_len"] = 256
        return out

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if cfg.micro_batch != 1:
            raise ValueError(f"--micro-batch {cfg.micro_batch} does not apply to --recipe {self.name} (each "
                             f"micro-batch is one packed sequence of --seq-len tokens): drop it and size --seq-len "
                             f"instead")
        from tritonrun.gpt2.ops import DENSE_WINDOW_MASK_MAX_T, dense_window_refusal, parse_op_list

        torch_attention = cfg.backend == "torch" or "window_attention" in parse_op_list(cfg.torch_ops)
        if cfg.device == "cuda" and torch_attention and not cfg.compile and cfg.seq_len > DENSE_WINDOW_MASK_MAX_T:
            raise ValueError(dense_window_refusal(cfg.seq_len))
        if cfg.total_batch_tokens % cfg.seq_len:
            k = max(1, round(cfg.total_batch_tokens / cfg.seq_len))
            raise ValueError(f"--total-batch-tokens {cfg.total_batch_tokens} is not a multiple of --seq-len "
                             f"{cfg.seq_len} (--recipe {self.name} accumulates packed sequences of --seq-len "
                             f"tokens): make it {k * cfg.seq_len} ({k} x {cfg.seq_len}), or pick a --seq-len that "
                             f"divides it")

    def loaders(self, cfg, train_files, val_file, device, rank: int, world_size: int):
        """One packed sequence of seq_len tokens per micro-batch with its cu_seqlens. Training reads contiguous chunks
        as the 2024-12-17 record does, or with --doc-aligned starts each sequence at a document start (the 2025-07-12
        record's rule); validation reads contiguous windows, the record's val tokens exactly."""
        from tritonrun.data.loader import PackedLoader, doc_slots_for

        aligned = cfg.doc_aligned  # --doc-aligned; default off: the record's contiguous chunks
        slots = doc_slots_for(cfg.seq_len)  # a fixed cu_seqlens length: one compiled graph
        return (PackedLoader(train_files, cfg.seq_len, device, rank=rank, world_size=world_size, doc_aligned=aligned,
                             doc_slots=slots),
                PackedLoader([val_file], cfg.seq_len, device, rank=rank, world_size=world_size, doc_aligned=False,
                             doc_slots=slots))

    def flops_per_token(self, model, cfg) -> int:
        """The windowed attention's FLOPs averaged over the run's window schedule (one MFU basis for the run)."""
        schedule = self.schedule(cfg, model)
        windows = [schedule.window(s) for s in range(cfg.max_steps)]
        per_window = {w: model.flops_per_token(cfg.seq_len, w) for w in set(windows)}
        return round(sum(per_window[w] for w in windows) / len(windows))


RECIPE = Record20241217(name="speedrun", replicates=RECORD_NAME, model_kind="speedrun", op_names=SPEEDRUN_OPS,
                        tokens_to_target=1490 * 524_288,
                        tokens_source="modded-nanogpt 2024-12-17 record: 1490 steps x 524,288 tokens, val 3.2794; "
                                      "tritonrun/gpt2/speedrun.py")
