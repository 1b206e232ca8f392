#!/usr/bin/env python
"""Per-kernel benchmark: each Triton kernel against its PyTorch peers at GPT-2 shapes.

    python bench/kernels.py                      # every op, full shapes; writes bench/results/*.json
    python bench/kernels.py --op gelu --quick    # one op, rows = 16*1024 only, shorter runs
    python bench/kernels.py --plot               # ... and a PNG next to the record
    python bench/kernels.py --plot bench/results/kernels-*.json   # PNGs from existing records, no GPU
    python bench/kernels.py --allow-cpu --quick  # no GPU: interpreter smoke run, NOT a timing

For every op and shape: fwd, bwd and fwd+bwd medians (triton.testing.do_bench, 20/50/80% quantiles;
do_bench flushes L2 before each call and the inputs rotate over several sets, so caches don't
flatter), for the Triton kernel and each peer (torch eager, torch.compile). Reported: ms, GB/s (the
kernel file's `bytes_moved` formula, the same for every implementation: effective bandwidth of the
minimum traffic), % of the GPU's peak bandwidth, and the Triton kernel's speedup over each peer.
Before timing, every implementation's outputs and gradients are checked against eager PyTorch.

Shapes: rows = B*T = 16*1024 and 32*1024, C = 768 (GPT-2 124M); GELU runs on the MLP's hidden
width 4C = 3072, where GPT-2 applies it. Dtypes (--dtype autocast, the default) are what bf16-autocast
training feeds each op: add_layernorm gets a bf16 branch output + the fp32 residual stream + fp32
params, layernorm (the first, on the embeddings) fp32, GELU bf16 (c_fc's output).

Cases are a registry (CASES: op name -> function), so later kernels add one entry each.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# First, before any import: this script's own folder (bench/) is sys.path[0], and this file is named
# kernels.py, so `import kernels` would import this script instead of the repo's kernels/ package.
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
PASSES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.2, 0.5, 0.8)

# Peak DRAM bandwidth, GB/s, from vendor spec sheets; matched as a substring of
# torch.cuda.get_device_name(), first match wins (so the more specific names come first).
PEAK_GBPS: list[tuple[str, float]] = [
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
    ("RTX 4090", 1008), ("RTX 4080 SUPER", 736), ("RTX 4080", 717), ("RTX 4070 Ti SUPER", 672),
    ("RTX 4070 Ti", 504), ("RTX 4070 SUPER", 504), ("RTX 4070", 504),
    ("RTX 3090 Ti", 1008), ("RTX 3090", 936), ("L40S", 864), ("L40", 864), ("L4", 300),
]


def peak_gbps(device_name: str) -> float | None:
    return next((gbps for key, gbps in PEAK_GBPS if key in device_name), None)


# --------------------------------------------------------------------------------------- machinery


@dataclass
class Ctx:
    device: torch.device
    smoke: bool  # CPU interpreter run: not a timing
    quick: bool
    dtype_mode: str  # autocast | fp32 | bf16 | fp16
    peers: list[str]
    rows: list[int]
    C: int
    results: list[dict] = field(default_factory=list)

    def low(self) -> torch.dtype:
        """The training low precision: bf16, or fp16 under the interpreter (no bf16 arithmetic)."""
        return torch.float16 if self.smoke else torch.bfloat16

    def dtype(self, role: str) -> torch.dtype:
        """Dtype of a tensor by role: 'low' (matmul outputs under autocast), 'high' (fp32 stream/params)."""
        if self.dtype_mode == "autocast":
            return self.low() if role == "low" else torch.float32
        d = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype_mode]
        return torch.float16 if (self.smoke and d == torch.bfloat16) else d


def timer(ctx: Ctx, fn: Callable[[], object]) -> list[float]:
    """[q20, median, q80] in ms."""
    if ctx.smoke:  # exercises the path only; wall-clock of the interpreter means nothing
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        times.sort()
        return [times[0], times[1], times[2]]
    import triton.testing

    warmup, rep = (10, 40) if ctx.quick else (25, 100)
    return list(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))


def n_sets(ctx: Ctx, set_bytes: int) -> int:
    """Input sets to rotate through: together at least twice the L2, 2..8 sets."""
    if ctx.smoke:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(ctx.device), "L2_cache_size", 50 << 20)
    return max(2, min(8, math.ceil(2 * l2 / max(set_bytes, 1)) + 1))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_close(name: str, got, want, dtypes_low: bool) -> str | None:
    """Loose sanity check against eager PyTorch (the tests hold the tight ones)."""
    tol = 3e-2 if dtypes_low else 1e-4
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        g, w = g.float(), w.float()
        err = (g - w).abs().max().item()
        scale = max(w.abs().max().item(), 1e-6)
        if not math.isfinite(err) or err > tol * scale:
            return f"{name}: output/grad {i} off by {err:.3g} (scale {scale:.3g})"
    return None


def bench_impls(ctx: Ctx, op: str, shape: dict, dtypes: dict, make_set: Callable[[int], tuple],
                impls: dict[str, Callable], nbytes: dict[str, int]) -> None:
    """Time fwd / bwd / fwd+bwd of each implementation on rotating input sets; append result rows.

    make_set(seed) -> (inputs: list of leaf tensors requiring grad, grad_outputs: list)."""
    probe_inputs, probe_grads = make_set(0)
    set_bytes = sum(t.numel() * t.element_size() for t in (*probe_inputs, *probe_grads))
    sets = [(probe_inputs, probe_grads)] + [make_set(i) for i in range(1, n_sets(ctx, set_bytes))]
    low = any(dt in (torch.bfloat16, torch.float16) for dt in dtypes.values())

    def outputs_and_grads(fn, inputs, grads):
        outs = _as_tuple(fn(*inputs))
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))

    reference = outputs_and_grads(impls["torch"], *sets[0])
    for impl, fn in impls.items():
        status = check_close(impl, outputs_and_grads(fn, *sets[0]), reference, low) if impl != "torch" else None
        if status:
            print(f"  CHECK FAILED {op} {shape} {status}")
        # Graphs for the backward-only timing: one forward per set, retained across calls.
        graphs = [(_as_tuple(fn(*inp)), inp, g) for inp, g in sets]
        step = {"i": 0}

        def next_set(pool):
            step["i"] += 1
            return pool[step["i"] % len(pool)]

        def run_fwd():
            inp, _ = next_set(sets)
            return fn(*inp)

        def run_bwd():
            outs, inp, g = next_set(graphs)
            return torch.autograd.grad(outs, inp, g, retain_graph=True, allow_unused=True)

        def run_both():
            inp, g = next_set(sets)
            return torch.autograd.grad(_as_tuple(fn(*inp)), inp, g, allow_unused=True)

        for pass_, run in zip(PASSES, (run_fwd, run_bwd, run_both)):
            q20, med, q80 = timer(ctx, run)
            gbps = nbytes[pass_] / (med * 1e-3) / 1e9
            ctx.results.append({
                "op": op, "shape": shape, "dtypes": {k: str(v).replace("torch.", "") for k, v in dtypes.items()},
                "pass": pass_, "impl": impl, "ms": med, "ms_q20": q20, "ms_q80": q80, "bytes": nbytes[pass_],
                "gbps": gbps, "check": status or "ok",
            })
        del graphs
    del sets


def peer_impls(ctx: Ctx, triton_fn: Callable, torch_fn: Callable) -> dict[str, Callable]:
    impls = {"triton": triton_fn, "torch": torch_fn}
    if "compile" in ctx.peers:
        # The backward-only timing replays retained graphs (retain_graph=True); AOTAutograd's donated
        # buffers (reusing saved tensors' memory for grads, a memory saving) forbid that. Recorded.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        impls["torch.compile"] = torch.compile(torch_fn, dynamic=False)
    return impls


# ------------------------------------------------------------------------------------------- cases


def case_layernorm(ctx: Ctx) -> None:
    from gpt2.ops import torch_layer_norm
    from kernels import layernorm as ln

    C, dev = ctx.C, ctx.device
    xd, pd = ctx.dtype("high"), ctx.dtype("high")  # the first LN normalizes the fp32 embedding sum
    for rows in ctx.rows:
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, C, device=dev, generator=g).to(xd).requires_grad_()
            w = (1 + 0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            b = (0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            return [x, w, b], [torch.randn(rows, C, device=dev, generator=g).to(xd)]

        nbytes = {p: ln.bytes_moved(rows, C, p, x=xd, y=xd, w=pd) for p in PASSES}
        bench_impls(ctx, "layernorm", {"rows": rows, "C": C}, {"x": xd, "weight": pd}, make_set,
                    peer_impls(ctx, ln.layer_norm, torch_layer_norm), nbytes)


def case_add_layernorm(ctx: Ctx) -> None:
    from gpt2.ops import torch_add_layer_norm
    from kernels import layernorm as ln

    C, dev = ctx.C, ctx.device
    xd, rd, pd = ctx.dtype("low"), ctx.dtype("high"), ctx.dtype("high")
    yd = torch.promote_types(xd, rd)
    for rows in ctx.rows:
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, C, device=dev, generator=g).to(xd).requires_grad_()
            r = torch.randn(rows, C, device=dev, generator=g).to(rd).requires_grad_()
            w = (1 + 0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            b = (0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            dy, ds = (torch.randn(rows, C, device=dev, generator=g).to(yd) for _ in range(2))
            return [x, r, w, b], [dy, ds]

        nbytes = {p: ln.bytes_moved(rows, C, p, x=xd, y=yd, w=pd, residual=rd) for p in PASSES}
        bench_impls(ctx, "add_layernorm", {"rows": rows, "C": C}, {"x": xd, "residual": rd, "weight": pd},
                    make_set, peer_impls(ctx, ln.add_layer_norm, torch_add_layer_norm), nbytes)


def case_gelu(ctx: Ctx) -> None:
    from gpt2.ops import torch_gelu
    from kernels import gelu as ge

    H, dev, xd = 4 * ctx.C, ctx.device, ctx.dtype("low")  # GELU sits on the MLP's 4C-wide hidden layer
    for rows in ctx.rows:
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, H, device=dev, generator=g).to(xd).requires_grad_()
            return [x], [torch.randn(rows, H, device=dev, generator=g).to(xd)]

        nbytes = {p: ge.bytes_moved(rows * H, p, dtype=xd) for p in PASSES}
        bench_impls(ctx, "gelu", {"rows": rows, "C": H}, {"x": xd}, make_set,
                    peer_impls(ctx, ge.gelu, torch_gelu), nbytes)


CASES: dict[str, Callable[[Ctx], None]] = {
    "layernorm": case_layernorm,
    "add_layernorm": case_add_layernorm,
    "gelu": case_gelu,
    # ---- later kernels register here, one entry each ----
    # "adamw": case_adamw,  # kernels/adamw.py's issue: FusedAdamW over the 124M model's 148 tensors;
    #                       # peers torch.optim.AdamW fused=True and foreach=True (no fwd/bwd passes:
    #                       # time one optimizer step, bytes = params + grads + 2 moments (+ masters)).
    # "attention": ...,      # kernels/attention.py
    # "cross_entropy": ...,  # kernels/cross_entropy.py
}


# ------------------------------------------------------------------------------ records and output


def speedups(results: list[dict]) -> list[dict]:
    """triton's speedup over each peer (peer ms / triton ms) and over the best peer, per op/shape/pass."""
    out, groups = [], {}
    for r in results:
        groups.setdefault((r["op"], json.dumps(r["shape"]), r["pass"]), {})[r["impl"]] = r["ms"]
    for (op, shape, pass_), ms in groups.items():
        if "triton" not in ms:
            continue
        peers = {k: v for k, v in ms.items() if k != "triton"}
        row = {"op": op, "shape": json.loads(shape), "pass": pass_,
               "vs": {k: v / ms["triton"] for k, v in peers.items()}}
        if peers:
            best = min(peers, key=peers.get)
            row["best_peer"], row["vs_best_peer"] = best, peers[best] / ms["triton"]
        out.append(row)
    return out


def print_table(results: list[dict], ratios: list[dict], peak: float | None) -> None:
    head = (f"{'op':<14}{'rows x C':>13}{'pass':>9}{'impl':>15}{'ms':>10}{'q20-q80':>17}{'GB/s':>9}{'%peak':>7}"
            f"{'triton x':>10}")
    print(head)
    print("-" * len(head))
    ratio_of = {(r["op"], json.dumps(r["shape"]), r["pass"]): r["vs"] for r in ratios}
    for r in results:
        shape = f"{r['shape']['rows']}x{r['shape']['C']}"
        pct = f"{100 * r['gbps'] / peak:.0f}" if peak else "-"
        vs = ratio_of.get((r["op"], json.dumps(r["shape"]), r["pass"]), {}).get(r["impl"])
        vs_s = f"{vs:.2f}" if vs is not None else ""
        flag = "" if r["check"] == "ok" else "  CHECK FAILED"
        print(f"{r['op']:<14}{shape:>13}{r['pass']:>9}{r['impl']:>15}{r['ms']:>10.4f}"
              f"{r['ms_q20']:>8.4f}-{r['ms_q80']:<8.4f}{r['gbps']:>9.1f}{pct:>7}{vs_s:>10}{flag}")
    print("triton x = the peer's median / triton's median (> 1: the Triton kernel is faster)")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot_record(path: Path) -> Path:
    """One PNG per record: GB/s per implementation for every op, shape and pass, peak as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(Path(path).read_text())
    results = rec["results"]
    groups = list(dict.fromkeys((r["op"], r["shape"]["rows"], r["shape"]["C"], r["pass"]) for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    value = {(r["op"], r["shape"]["rows"], r["shape"]["C"], r["pass"], r["impl"]): r["gbps"] for r in results}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 4.5))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [value.get((*grp, impl), 0.0) for grp in groups], width, label=impl)
    if rec.get("peak_gbps"):
        ax.axhline(rec["peak_gbps"], color="k", linestyle="--", linewidth=1, label=f"peak {rec['peak_gbps']:.0f} GB/s")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{op}\n{rows}x{C}\n{p}" for op, rows, C, p in groups], fontsize=7)
    ax.set_ylabel("GB/s (minimum bytes moved / median time)")
    title = f"{rec['env']['device']} · {rec['date']} · {rec['env']['commit'][:10]}"
    if rec.get("smoke"):
        title = "SMOKE (CPU interpreter, NOT A TIMING) · " + title
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark each Triton kernel against its PyTorch peers at GPT-2 shapes.")
    p.add_argument("--op", action="append", choices=sorted(CASES), help="op to run (repeatable; default: all)")
    p.add_argument("--quick", action="store_true", help="rows = 16*1024 only and shorter runs")
    p.add_argument("--plot", nargs="*", metavar="RECORD", default=None,
                   help="write a PNG next to this run's record; with record paths: plot those and exit "
                        "(no GPU needed)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU, run a tiny Triton-interpreter smoke pass (NOT a timing; no record in "
                        "bench/results)")
    p.add_argument("--dtype", choices=("autocast", "fp32", "bf16", "fp16"), default="autocast",
                   help="autocast: the dtypes bf16-autocast training feeds each op (default); else one dtype "
                        "everywhere")
    p.add_argument("--peers", default="torch,compile", help="comma list from: torch (always run), compile")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"where the JSON record goes (default {RESULTS_DIR.relative_to(REPO)}; smoke runs write "
                        "a record only when this is given, and never into bench/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:  # record paths given: plot only
        for path in args.plot:
            print(f"wrote {plot_record(Path(path))}")
        return 0
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.allow_cpu:
        print("error: no CUDA GPU: bench/kernels.py times GPU kernels; pass --allow-cpu for an interpreter "
              "smoke run (not a timing)", file=sys.stderr)
        return 2
    smoke = not has_cuda
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernels/ module is imported (the cases import lazily)
        if args.out_dir is not None and args.out_dir.resolve() == RESULTS_DIR.resolve():
            print("error: smoke runs never write into bench/results (README figures come from GPU records only)",
                  file=sys.stderr)
            return 2
        print("=" * 88)
        print("SMOKE RUN ON CPU through the Triton interpreter: NOT A TIMING. The numbers below only show")
        print("that every case, peer and record field works; never quote them. Run on a CUDA GPU to measure.")
        print("=" * 88)
    device = torch.device("cuda" if has_cuda else "cpu")
    from runinfo import atomic_write_json, env_info

    ctx = Ctx(device=device, smoke=smoke, quick=args.quick, dtype_mode=args.dtype,
              peers=[p.strip() for p in args.peers.split(",") if p.strip()],
              rows=[16] if smoke else ([16 * 1024] if args.quick else [16 * 1024, 32 * 1024]),
              C=768)
    env = env_info(device)
    peak = None if smoke else peak_gbps(env["device"])
    print(f"device: {env['device']}  peak: {f'{peak:.0f} GB/s' if peak else 'unknown'}  torch {env['torch']}  "
          f"triton {env['triton']}  commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}")
    torch.manual_seed(0)
    for op in args.op or list(CASES):
        t0 = time.perf_counter()
        CASES[op](ctx)
        print(f"  {op}: {time.perf_counter() - t0:.1f} s")
    for r in ctx.results:
        r["pct_peak"] = 100 * r["gbps"] / peak if peak else None
    ratios = speedups(ctx.results)
    print_table(ctx.results, ratios, peak)
    bad = [r for r in ctx.results if r["check"] != "ok"]

    now = datetime.datetime.now()
    record = {
        "kind": "kernels", "smoke": smoke, "date": now.isoformat(timespec="seconds"), "env": env,
        "peak_gbps": peak, "args": {"op": args.op or list(CASES), "quick": args.quick, "dtype": args.dtype,
                                    "peers": ctx.peers},
        "timer": "perf_counter x3 (smoke: not a timing)" if smoke else
                 f"triton.testing.do_bench quantiles {list(QUANTILES)}, L2 flushed, inputs rotated",
        "bytes_formula": "kernels/<op>.py bytes_moved(): minimum DRAM traffic, same for every implementation",
        "notes": "bwd = autograd.grad on retained graphs (one forward per rotating input set); torch.compile "
                 "runs with torch._functorch.config.donated_buffer=False, which retained graphs need",
        "results": ctx.results, "speedups": ratios,
    }
    out_dir = args.out_dir if args.out_dir is not None else (None if smoke else RESULTS_DIR)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"kernels-{'smoke-' if smoke else ''}{slug(env['device'])}-{now.strftime('%Y%m%d-%H%M%S')}.json"
        path = out_dir / name
        atomic_write_json(path, record)
        print(f"wrote {path}")
        if args.plot is not None:
            print(f"wrote {plot_record(path)}")
    elif args.plot is not None:
        print("no record written (smoke run without --out-dir): nothing to plot")
    if smoke:
        print("SMOKE RUN: NOT A TIMING.")
    if bad:
        print(f"error: {len(bad)} result(s) failed the correctness check against eager PyTorch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
