"""Generate text from a tritonrun checkpoint (either recipe: GPT-2 or the speedrun model), a Hugging Face GPT-2
directory or an llm.c model file.

    python sample.py --checkpoint runs/my-run --prompt "The meaning of life is" --num-samples 3
    python sample.py --init-from hf:path/to/gpt2 --top-k 50 --temperature 0.8 --seed 42
    python sample.py --init-from llmc:gpt2_124M.bin --temperature 0        # greedy

Every sample starts from <|endoftext|> (as every training document does) followed by the prompt, and ends at
--max-new-tokens or at the first generated <|endoftext|>. Sampling draws from a torch.Generator seeded with
--seed, so a fixed seed, model, device and arguments give the same text every run. --temperature 0 is greedy
(argmax); --top-k K keeps the K most likely tokens (0 = all). Only the real 50257-token vocabulary can be
sampled (the model's logits exclude the padded rows). The context is cropped to the model's block_size.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from tritonrun.data.tokenizer import EOT


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
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated as one batch (%(default)s)")
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


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, stop_token: int | None = EOT) -> list[list[int]]:
    """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns the new tokens per row, each cut
    after its first stop_token (which is kept). Greedy when temperature == 0."""
    block_size = model.config.block_size
    B = idx.size(0)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    new = []
    for _ in range(max_new_tokens):
        ctx = idx[:, -block_size:]
        # model(ctx) at the last position only: the same hidden states and real-vocab LM head as forward()
        logits = model.logits(model.hidden(ctx)[:, -1, :]).float()  # (B, vocab_size)
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        new.append(nxt)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if stop_token is not None:
            done |= nxt == stop_token
            if bool(done.all()):
                break
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(B)]
    if stop_token is not None:
        rows = [r[: r.index(stop_token) + 1] if stop_token in r else r for r in rows]
    return rows


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
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    try:
        rows = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, generator)
    except torch.OutOfMemoryError:
        sys.stderr.write(f"error: out of memory on {device}: lower --num-samples or use --device cpu\n")
        return 2
    for i, row in enumerate(rows):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---")
        print(enc.decode(prompt[1:] + row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
