"""Generate text from a tritonrun checkpoint (either recipe: GPT-2 or the speedrun model), a Hugging Face GPT-2
directory or an llm.c model file.

    python sample.py --checkpoint runs/my-run --prompt "The meaning of life is" --num-samples 3
    python sample.py --init-from hf:path/to/gpt2 --top-k 50 --temperature 0.8 --seed 42
    python sample.py --init-from llmc:gpt2_124M.bin --temperature 0        # greedy

Every sample starts from <|endoftext|> (as every training document does) followed by the prompt, and ends at
--max-new-tokens or at the first generated <|endoftext|>. Tokens print as they come: each one runs the model once
over itself, attending to a key/value cache of the tokens before it (tritonrun/gpt2/kv_cache.py), instead of
re-reading the whole context. GPT-2 and the dense speedrun model stop at their context (block_size, prompt
included: --max-new-tokens is capped there, with a note); the windowed speedrun model attends only to its last
window of tokens within the current document, so it slides on past its block_size with a cache of one window.
Ctrl-C stops a sample and keeps what was printed.

Sampling draws from a torch.Generator seeded with --seed, so a fixed seed, model, device and arguments give the
same text every run; samples are generated one after another. --temperature 0 is greedy (argmax); --top-k K keeps
the K most likely tokens (0 = all). Only the real 50257-token vocabulary can be sampled (the model's logits exclude
the padded rows).
"""
from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from tritonrun.data.loader import doc_bounds
from tritonrun.data.tokenizer import EOT
from tritonrun.gpt2.kv_cache import KVCache


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Sample text from a GPT-2 or speedrun checkpoint.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="tritonrun checkpoint file, or a run dir (its newest checkpoint)")
    src.add_argument("--init-from", help="hf:DIR (Hugging Face), llmc:FILE.bin (llm.c) or ckpt:PATH")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample (%(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the K most likely tokens, 0 = all (%(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, 0 = greedy (%(default)s)")
    p.add_argument("--num-samples", type=int, default=1, help="samples, one after another (%(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator (%(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (%(default)s)")
    return p


def _check_args(args) -> None:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = no top-k), got {args.top_k}")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def pick_next(logits: torch.Tensor, temperature: float, top_k: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row of logits (B, vocab): argmax when temperature == 0, else a draw from the softmax of
    logits / temperature over the top_k most likely (0: all)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def room_after(model, prompt_len: int) -> int | None:
    """New tokens that fit after a prompt of prompt_len tokens: the context left, or None for a model that slides
    (the windowed speedrun model)."""
    if KVCache.for_model(model).slides:
        return None
    return max(0, model.config.block_size - prompt_len)


@torch.no_grad()
def stream(model, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None, stop_token: int | None = EOT) -> Iterator[int]:
    """Yield up to max_new_tokens tokens continuing `prompt`, one model call per token over a KVCache; stops after
    the first stop_token (which is yielded). ValueError when the prompt plus the tokens asked for exceed a
    non-sliding model's context (room_after says how many fit)."""
    room = room_after(model, len(prompt))
    if room is not None and max_new_tokens > room:
        raise ValueError(f"{len(prompt)} prompt tokens + {max_new_tokens} new exceed the model's context of "
                         f"{model.config.block_size}")
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    cache = KVCache.for_model(model)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model.logits(model.hidden(idx, cache=cache)[:, -1, :])
        nxt = pick_next(logits, temperature, top_k, generator)
        token = int(nxt.item())
        yield token
        if token == stop_token:
            return
        idx = nxt[:, None]


@torch.no_grad()
def generate_uncached(model, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                      generator: torch.Generator | None = None, stop_token: int | None = EOT) -> list[int]:
    """What stream() computes, the slow way: the model's full forward over the whole context for every token,
    documents split at end-of-text tokens and the final window for the windowed model (the training forward's
    rule). The reference the cached path is tested against; within the context only."""
    device = next(model.parameters()).device
    windowed = getattr(model.config, "attention", "dense") == "window"
    ctx, new = list(prompt), []
    for _ in range(max_new_tokens):
        idx = torch.tensor([ctx], dtype=torch.long, device=device)
        if windowed:  # the packed loader's document bounds: a document starts at each end-of-text token
            cu = torch.from_numpy(doc_bounds(np.asarray(ctx))).to(device)
            y = model.hidden(idx, cu, model.config.final_window)
        else:
            y = model.hidden(idx)
        token = int(pick_next(model.logits(y[:, -1, :]), temperature, top_k, generator).item())
        new.append(token)
        ctx.append(token)
        if token == stop_token:
            break
    return new


def load(args, device: torch.device):
    from tritonrun.gpt2.checkpoint import load_model
    from tritonrun.gpt2.checkpoint import resolve_checkpoint
    from tritonrun.gpt2.hf import init_from

    if args.checkpoint is not None:
        model = load_model(resolve_checkpoint(args.checkpoint), device=device)
    else:
        model = init_from(args.init_from).to(device)
    return model.eval()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tritonrun.data.tokenizer import TokenizerError, gpt2_tokenizer

    try:
        _check_args(args)
        device = _device(args.device)
        enc = gpt2_tokenizer()
        model = load(args, device)
        if model.config.vocab_size != enc.n_vocab:
            raise ValueError(f"model vocab_size {model.config.vocab_size} does not match the GPT-2 tokenizer's "
                             f"{enc.n_vocab} tokens")
        prompt = [EOT] + enc.encode(args.prompt, allowed_special={"<|endoftext|>"})
    except (ValueError, OSError, TokenizerError, torch.OutOfMemoryError) as e:  # Checkpoint/HF/llm.c errors: ValueError
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        sys.stderr.write(f"error: {msg.splitlines()[0] if msg else type(e).__name__}\n")
        return 2

    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    max_new = args.max_new_tokens
    room = room_after(model, len(prompt))
    if room is not None and max_new > room:
        if room == 0:
            sys.stderr.write(f"error: the prompt is {len(prompt)} tokens (with the leading <|endoftext|>), the "
                             f"model's whole context of {model.config.block_size}: shorten --prompt\n")
            return 2
        sys.stderr.write(f"note: --max-new-tokens {max_new} capped at {room}: the model's context is "
                         f"{model.config.block_size} tokens, {len(prompt)} of them the prompt\n")
        max_new = room
    for i in range(args.num_samples):
        code = _print_sample(enc, model, prompt, max_new, args, generator, i, device)
        if code:
            return code
    return 0


def _print_sample(enc, model, prompt, max_new, args, generator, i, device) -> int:
    """Stream one sample to stdout (prompt, then each token as it comes); 130 on Ctrl-C, 2 out of memory."""
    out = sys.stdout
    if args.num_samples > 1:
        out.write(f"--- sample {i + 1}/{args.num_samples} ---\n")
    out.write(enc.decode(prompt[1:]))
    out.flush()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character can span tokens
    n = 0
    try:
        for token in stream(model, prompt, max_new, args.temperature, args.top_k, generator):
            out.write(text.decode(enc.decode_single_token_bytes(token)))
            out.flush()
            n += 1
    except KeyboardInterrupt:
        out.write(text.decode(b"", final=True) + "\n")
        out.flush()
        sys.stderr.write(f"interrupted: sample {i + 1} stopped after {n} new tokens; what was printed is kept\n")
        return 130
    except torch.OutOfMemoryError:
        out.write("\n")
        sys.stderr.write(f"error: out of memory on {device}: use --device cpu\n")
        return 2
    out.write(text.decode(b"", final=True) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
