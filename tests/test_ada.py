"""bench/ada.py: every Triton kernel launch the GPU presets can make, compiled for its architecture without a
GPU, fits: shared memory within the per-block limit, no register spills (ptxas -v), bf16 dots on tensor cores.

One `python bench/ada.py --arch sm_89,sm_80,sm_90` run (a subprocess: the kernels must be real JITFunctions,
and conftest sets TRITON_INTERPRET=1 here) feeds the per-arch checks. Cold (empty Triton cache) it compiles
~140 kernels in ~2.5 min on 2 cores; Triton's on-disk cache (and the ptxas numbers cached beside each
kernel) makes later runs ~15 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script, shared_across_workers

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "ada.py"
CHECKED_ARCHS = ("sm_89", "sm_80", "sm_90")


ada = load_script("bench/ada.py", "bench_ada")

# Every kernel each kernel file launches from its host code, and the ones whose tl.dot takes bf16 under
# bf16 autocast (those must lower to bf16 tensor-core instructions).
EXPECTED_KERNELS = {
    "attention._attn_fwd", "attention._attn_bwd_delta", "attention._attn_bwd_dkdv", "attention._attn_bwd_dq",
    "layernorm._ln_fwd_kernel", "layernorm._ln_bwd_kernel", "layernorm._ln_dwdb_kernel",
    "gelu._gelu_fwd_kernel", "gelu._gelu_bwd_kernel",
    "cross_entropy._lce_fwd_kernel", "cross_entropy._lce_bwd_dh_kernel", "cross_entropy._lce_bwd_dw_kernel",
    "adamw._adamw_kernel", "adamw._grad_sumsq_kernel", "adamw._finalize_norm_kernel",
    # issue 26's speedrun ops
    "rmsnorm._rms_fwd_kernel", "rmsnorm._rms_bwd_kernel", "rmsnorm._mix_rms_bwd_kernel", "rmsnorm._mix_dl_kernel",
    "relu2._relu2_fwd_kernel", "relu2._relu2_bwd_kernel",
    "rope._qk_norm_rope_fwd_kernel", "rope._qk_norm_rope_bwd_kernel",
    # issue 27's window attention
    "window_attention._wattn_fwd", "window_attention._wattn_bwd_dkdv", "window_attention._wattn_bwd_dq",
    # issue 35: record #89's bigram hash embedding (every architecture: no tensor cores involved)
    "bigram._bigram_fwd_kernel", "bigram._bigram_bwd_kernel",
    # issue 35: record #89's fused ReLU^2 MLP step (bf16 everywhere; its FP8 variant on sm_89 / sm_90)
    "mlp_relu2._linear_relu2_kernel",
    # issue 35: record #89's fused LM head loss (multi-token prediction + prefix term)
    "mtp_head._mtp_fwd_kernel", "mtp_head._mtp_bwd_dh_kernel", "mtp_head._mtp_bwd_dw_kernel",
}
# issue 35's FP8 matmuls: launched only where FP8 tensor cores exist (sm_89, sm_90), by the d12 speedrun model
FP8_KERNELS = {"fp8._quantize_kernel", "fp8._scaled_mm_kernel"}
FP8_ARCHS = ("sm_89", "sm_90")
WINDOW_KERNELS = {"window_attention._wattn_fwd", "window_attention._wattn_bwd_dkdv", "window_attention._wattn_bwd_dq"}
BF16_DOT_KERNELS = {
    "mlp_relu2._linear_relu2_kernel",
    "mtp_head._mtp_fwd_kernel", "mtp_head._mtp_bwd_dh_kernel", "mtp_head._mtp_bwd_dw_kernel",
    "attention._attn_fwd", "attention._attn_bwd_dkdv", "attention._attn_bwd_dq",
    "cross_entropy._lce_fwd_kernel", "cross_entropy._lce_bwd_dh_kernel", "cross_entropy._lce_bwd_dw_kernel",
    *WINDOW_KERNELS,
}


def _what(r: dict) -> str:
    return f"{r['arch']} {r['kernel']} [{r['config']}]"


@pytest.fixture(scope="module")
def records(request) -> list[dict]:
    for arch in CHECKED_ARCHS:
        path, _ = ada.ptxas_info(ada.ARCHS[arch].cc)
        if path is None:
            pytest.skip(f"no ptxas for {arch}: triton.backends.nvidia.compiler.get_ptxas("
                        f"{ada.ARCHS[arch].cc}) finds no binary (triton/backends/nvidia/bin/ptxas*), so registers "
                        "and spills cannot be counted")
    return shared_across_workers(request, "ada", compile_every_kernel)


def compile_every_kernel(directory: Path) -> list[dict]:
    """The records of one `bench/ada.py --arch sm_89,sm_80,sm_90 --json` run: the expensive part of `records`,
    done once per session however many xdist workers run this module's tests."""
    out = directory / "ada.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", ",".join(CHECKED_ARCHS), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    # exit 1 = something does not fit: the per-arch tests below say what; anything else is a crash
    assert proc.returncode in (0, 1) and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", CHECKED_ARCHS)
def test_every_launch_fits(records, arch):
    """sm_89 (RTX 40xx): shared <= 101,376 B; sm_80: <= 166,912 B; sm_90: <= 232,448 B. No spilled registers.
    Every bf16 tl.dot lowers to bf16 mma.sync (sm_90: mma.sync or wgmma); fp8 dots: the test below."""
    rows = [r for r in records if r["arch"] == arch]
    assert rows, f"no {arch} records"
    limit = ada.ARCHS[arch].shared_per_block
    failures = []
    for r in rows:
        if r["error"]:
            failures.append(f"{_what(r)}: {r['error']}")
            continue
        if r["shared_bytes"] > limit:
            failures.append(f"{_what(r)}: {r['shared_bytes']} B of shared memory > {limit} B per block")
        if r["spill_bytes"] != 0:
            failures.append(f"{_what(r)}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded "
                            f"({r['registers']} registers)")
        if r["registers"] > 255:
            failures.append(f"{_what(r)}: {r['registers']} registers per thread > 255")
        if "bf16" in r["dot_inputs"]:
            mma = r["mma"]
            ok = "bf16" in mma and ("mma.sync.aligned" in mma or (arch == "sm_90" and "wgmma" in mma))
            if not ok:
                failures.append(f"{_what(r)}: bf16 tl.dot without a bf16 tensor-core instruction (PTX has: {mma})")
    assert not failures, f"{len(failures)} {arch} launch(es) do not fit:\n" + "\n".join(failures)
    assert all(r["fits"] for r in rows)  # the script's own verdict agrees


@pytest.mark.parametrize("arch", CHECKED_ARCHS)
def test_every_kernel_is_covered(records, arch):
    """Each kernel file's launches were all recorded, and the matmul kernels' dots were seen as bf16."""
    rows = [r for r in records if r["arch"] == arch]
    assert {r["kernel"] for r in rows} == EXPECTED_KERNELS | (FP8_KERNELS if arch in FP8_ARCHS else set())
    assert {r["kernel"] for r in rows if "bf16" in r["dot_inputs"]} == BF16_DOT_KERNELS
    dots = BF16_DOT_KERNELS | {"fp8._scaled_mm_kernel"}
    assert all(r["dot_inputs"] == [] for r in rows if r["kernel"] not in dots)


@pytest.mark.parametrize("arch", FP8_ARCHS)
def test_fp8_matmuls_run_on_fp8_tensor_cores(records, arch):
    """Every FP8 product (e4m3 x e4m3 forward, e5m2 x e4m3 backward) lowers to an FP8 tensor-core instruction:
    on Ada mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 (.e5m2.e4m3 in the backward), on Hopper wgmma with
    the same operand types; spill-free (test_every_launch_fits)."""
    mms = [r for r in records if r["arch"] == arch and r["kernel"] == "fp8._scaled_mm_kernel"]
    assert len(mms) == 3, [_what(r) for r in mms]  # forward, dx, dw
    want = ("mma.sync.aligned.m16n8k32.row.col.f32" if arch == "sm_89" else "wgmma.mma_async.sync.aligned")
    for r in mms:
        kinds = {"f8E4M3FN": "e4m3", "f8E5M2": "e5m2"}
        assert r["dot_inputs"] and all(t in kinds for t in r["dot_inputs"]), _what(r)
        assert want in r["mma"] and all(kinds[t] in r["mma"] for t in r["dot_inputs"]), (_what(r), r["mma"])
        assert "bf16" not in r["mma"] and r["spill_bytes"] == 0


@pytest.mark.parametrize("arch", CHECKED_ARCHS)
def test_autotune_spaces_and_layernorm_widths_recorded(records, arch):
    """The autotuners (attention, cross-entropy) may pick any TUNE_SPACE config on a GPU: all of them are
    compiled. LayerNorm's config depends on C: both widths of GPT-2 d12..d48 (BLOCK_N 1024 for C = 768/1024,
    2048 for 1280/1600) are."""
    from tritonrun.kernels import attention as attn
    from tritonrun.kernels import cross_entropy as ce

    rows = [r for r in records if r["arch"] == arch]

    def launched(fn, keys, head_dim=None):
        return {(*(r["constexprs"].get(k) for k in keys), r["num_warps"], r["num_stages"])
                for r in rows if r["kernel"] == fn and r["constexprs"].get("HEAD_DIM", head_dim) == head_dim}

    table = attn.arch_key((ada.ARCHS[arch].cc // 10, ada.ARCHS[arch].cc % 10))
    for kind, fn in (("fwd", "_attn_fwd"), ("bwd_dkdv", "_attn_bwd_dkdv"), ("bwd_dq", "_attn_bwd_dq")):
        for d in (64, 128):  # GPT-2's heads and the speedrun-dense model's
            space = attn.TUNE_SPACE[table][kind][d]
            assert launched(f"attention.{fn}", ("BLOCK_M", "BLOCK_N"), d) == set(space), (fn, d)
    keys = ("BLOCK_N", "BLOCK_V", "BLOCK_K", "BLOCK_C")
    for kind, fn in (("fwd", "_lce_fwd_kernel"), ("dh", "_lce_bwd_dh_kernel"), ("dw", "_lce_bwd_dw_kernel")):
        space = ce.TUNE_SPACE[arch][kind]  # the checked archs are the cross-entropy tables' own
        assert launched(f"cross_entropy.{fn}", keys, None) == \
            {(*(c.get(k) for k in keys), c["num_warps"], c["num_stages"]) for c in space}
    widths = {r["constexprs"]["BLOCK_N"] for r in rows if r["kernel"] == "layernorm._ln_fwd_kernel"}
    assert widths == {1024, 2048}
    # issue 26: the speedrun ops' RMSNorm, each prologue (plain, add, mix) at both widths
    rms = {(r["constexprs"]["PRE"], r["constexprs"]["BLOCK_N"]) for r in rows
           if r["kernel"] == "rmsnorm._rms_fwd_kernel"}
    assert rms == {(pre, n) for pre in (0, 1, 2) for n in (1024, 2048)}


@pytest.mark.parametrize("arch", CHECKED_ARCHS)
def test_window_attention_one_kernel_for_every_window(records, arch):
    """issue 27: window_attention at T = 65,536 and 16,384, windows 64 and 1,792, 6 heads of 128: each kernel is
    ONE compiled launch (its table config) used by all four -- the window is a runtime argument, never a
    specialization -- and it fits (test_every_launch_fits checks the numbers)."""
    from tritonrun.kernels import window_attention as wa

    rows = [r for r in records if r["arch"] == arch and r["kernel"] in WINDOW_KERNELS]
    assert {r["kernel"] for r in rows} == WINDOW_KERNELS
    cc = ada.ARCHS[arch].cc
    table = wa.CONFIGS[wa.arch_key((cc // 10, cc % 10))]
    for r in rows:
        kind = r["kernel"].split("._wattn_")[1]
        assert sum(x["kernel"] == r["kernel"] for x in rows) == 1, f"{_what(r)}: more than one specialization"
        cfg = table[kind][ada.SPEEDRUN_HEAD_DIM]
        assert (r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["num_warps"], r["num_stages"]) == cfg
        assert r["signature"]["window"] == "i32", r["signature"]  # no "=1", no "/16": not specialized
        variants = {u.split(": ", 1)[1] for u in r["used_by"]}
        assert variants == {f"window attention B=1 H=6 T={T} D=128 window={w}"
                            for T in ada.WINDOW_SEQ_LENS for w in ada.WINDOW_SIZES}
    assert wa.SHARED_LIMIT[arch] == ada.ARCHS[arch].shared_per_block


def test_markdown_section_from_record(records, tmp_path):
    """`--markdown RECORD` prints the README "Ada fit" section for sm_89 from the record, no compiling."""
    path = tmp_path / "ada.json"
    path.write_text(json.dumps(records))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(path), "--arch", "sm_89"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("## Ada fit\n")
    table = [line for line in text.splitlines() if line.startswith("| `")]
    sm89 = [r for r in records if r["arch"] == "sm_89"]
    assert len(table) == len(ada.merge_specializations(sm89))
    assert {line.split("`")[1] for line in table} == EXPECTED_KERNELS | FP8_KERNELS
    assert "101,376 B" in text and f"All {len(sm89)} launches fit" in text


# ------------------------------------------------------------------ pure parts (no compiling)


def test_every_gpu_preset_has_an_architecture():
    from tritonrun.presets import PRESETS

    cuda = {name for name, p in PRESETS.items() if p.device == "cuda"}
    assert cuda == set(ada.GPU_PRESETS), "add the new preset's (arch, SM count) to bench/ada.py GPU_PRESETS"
    assert {arch for arch, _ in ada.GPU_PRESETS.values()} == set(ada.ARCHS)


def test_shared_limits_agree_with_the_kernel_files():
    from tritonrun.kernels import attention as attn
    from tritonrun.kernels import cross_entropy as ce

    for arch, limit in {**attn.SHARED_LIMIT, **ce.ARCH_SHARED_LIMIT}.items():
        assert ada.ARCHS[arch].shared_per_block == limit == attn.SHARED_LIMIT[arch] == ce.ARCH_SHARED_LIMIT[arch]
    for a in ada.ARCHS.values():  # the per-SM capacity is the per-block limit plus the 1 KB block reserve
        assert a.shared_per_sm == a.shared_per_block + ada.SHARED_RESERVED_PER_BLOCK


@pytest.mark.parametrize("arch,warps,regs,shared,expect", [
    # CUDA occupancy calculator, cc 8.9: 256 threads, 128 regs -> 4096 regs/warp, 4 warps per sub-partition,
    # 16 warps = 2 blocks, 33%
    ("sm_89", 8, 128, 0, (16, 2, "registers")),
    ("sm_89", 4, 32, 0, (48, 12, "warps")),  # 1024 regs/warp: 64 warps' worth of registers, 48 warps max
    ("sm_89", 4, 33, 0, (48, 12, "registers+warps")),  # 33*32 = 1056 -> 1280 (256 unit): 12 per sub-partition
    ("sm_89", 4, 41, 0, (40, 10, "registers")),  # 1312 -> 1536: 10 warps per sub-partition
    ("sm_89", 8, 64, 50_176, (16, 2, "shared")),  # 2 x (50,176 + 1,024 reserved) = 102,400 B: exactly 2 blocks
    ("sm_89", 8, 64, 50_177, (8, 1, "shared")),  # rounded up to the 128-byte unit: only 1
    ("sm_89", 1, 16, 0, (24, 24, "blocks")),  # Ada: at most 24 blocks per SM
    ("sm_86", 1, 16, 0, (16, 16, "blocks")),  # sm_86: 16
    ("sm_80", 2, 16, 0, (64, 32, "warps+blocks")),
    ("sm_90", 8, 255, 200_000, (8, 1, "registers+shared")),
    ("sm_89", 16, 255, 0, (0, 0, "registers")),  # 16 warps x 8192 registers > 64K: cannot launch
])
def test_occupancy_formula(arch, warps, regs, shared, expect):
    occ = ada.occupancy(arch, warps, regs, shared)
    assert (occ["warps_per_sm"], occ["blocks_per_sm"], occ["limiter"]) == expect
    assert occ["occupancy"] == expect[0] / ada.ARCHS[arch].max_warps


def test_fit_problems_name_each_reason():
    good = {"arch": "sm_89", "error": None, "shared_bytes": 1000, "shared_limit": 101_376, "spill_bytes": 0,
            "spill_stores": 0, "spill_loads": 0, "registers": 100, "dot_inputs": ["bf16"],
            "mma": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"}
    assert ada.fit_problems(good) == []
    hopper = {**good, "arch": "sm_90", "mma": "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"}
    assert ada.fit_problems(hopper) == []
    assert "shared memory" in ada.fit_problems({**good, "shared_bytes": 101_377})[0]
    assert "spills" in ada.fit_problems({**good, "spill_bytes": 8, "spill_stores": 4, "spill_loads": 4})[0]
    assert "tensor-core" in ada.fit_problems({**good, "mma": "none"})[0]
    assert "tensor-core" in ada.fit_problems({**good, "mma": "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"})[0]
    assert ada.fit_problems({**good, "dot_inputs": [], "mma": "none"}) == []  # no dot, no tensor cores needed
    f8 = {**good, "dot_inputs": ["f8E4M3FN", "f8E5M2"], "mma": "mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e4m3.f32"}
    assert ada.fit_problems(f8) == []
    assert "fp8 tl.dot without an fp8 tensor-core" in ada.fit_problems({**f8, "mma": "none"})[0]


def test_short_mma():
    assert ada.short_mma("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma.sync m16n8k16 bf16"
    assert ada.short_mma("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16, "
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma m64n128k16+m64n64k16 bf16"
    assert ada.short_mma("none") == "none"


@pytest.mark.parametrize("arch", CHECKED_ARCHS)
def test_dense_attention_is_checked_at_every_head_dim_the_recipes_use(records, arch):
    """GPT-2's D = 64 and the speedrun-dense model's 6 heads of 128 (d12): both compile for each arch."""
    used = [u for r in records if r["arch"] == arch and r["kernel"].startswith("attention.") for u in r["used_by"]]
    assert any("D=64" in u for u in used) and any("H=6" in u and "D=128" in u for u in used), used[:5]


def test_launches_without_register_headroom_are_flagged():
    """A row at 250+ registers per thread is marked in the generated page, with what it means."""
    row = {"arch": "sm_89", "kernel": "attention._attn_fwd", "config": "BLOCK_M=128", "fits": True,
           "shared_bytes": 1024, "registers": 254, "spill_bytes": 0,
           "mma": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
           "occupancy": 0.25, "warps_per_sm": 12, "blocks_per_sm": 3, "limiter": "registers", "num_warps": 4,
           "used_by": ["rtx4070/d12: x"],
           "triton": "3", "ptxas": "12", "commit": "0" * 40}
    text = ada.markdown([row, {**row, "kernel": "gelu._gelu_fwd", "registers": 40}], "sm_89")
    assert "**254** ⚠" in text and "No register headroom (250+ of 255 per thread, 1 row)" in text
    assert "| `gelu._gelu_fwd` | BLOCK_M=128 | 1,024 | 40 |" in text
