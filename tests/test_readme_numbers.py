"""Every figure in README's results sections is traceable (issue 34, item 6): it is MEASURED, and then a committed
record under bench/results/ that the same section names holds it (GiB from bytes / 2**30, rounded to the decimals
README prints); or DERIVED (a projection included), and then README says so and gives the formula, which this
file recomputes; or CONFIGURATION, a value of the code itself (presets, run and recipe defaults, model configs); or
a figure listed in FIGURES below with where it is defined. A number no source accounts for fails the test.

The results sections, and why (README's other sections describe usage, not figures; see RESULTS_SECTIONS):
  Where each op runs today   MFU's FLOPs per token and matmul parameter counts: derived from the models.
  Presets                    the preset table (tritonrun/presets.py), the batch each card gets (estimates from the
                             memory records; its table is tests/test_dry_run.py's, not repeated here) and the
                             memory-cap figures.
  Memory                     the memory estimator's tables and picks: bench/results/memory-*.json.
  Recipes                    the recipes' figures (hyperparameters: configuration) and the CPU A/B, from
                             bench/results/recipes-cpu-*.json.
  Ada fit                    launch counts of bench/results/ada-*.json.
  Tests                      the paragraph that sizes and times the CPU suite (a labelled measurement).
  Status                     the window-attention and Muon FLOP arithmetic (derived, labelled).

Fast: no training, no kernel launch (models are built on the meta device; the window-attention tile count runs
its launcher's torch arithmetic on the CPU). The checks take README's text, so test_a_changed_figure_fails runs
them on mutated copies and sees each mutation caught.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
GIB = 2**30

RESULTS_SECTIONS = ("Where each op runs today", "Presets", "Memory", "Recipes", "Ada fit", "Tests", "Status")
# A section whose text sends the reader to another for its figures ("see Presets") takes that section's records.
REFERS = {"Recipes": ("Presets", "see Presets")}
# tests/test_dry_run.py checks this table of Presets against the memory records' searches, cell by cell.
BATCH_TABLE = "| preset | `speedrun`: packed tokens per micro-batch |"


# ------------------------------------------------------------------------------------------- README's figures
def sections(text: str) -> dict[str, str]:
    """Body of each "## " section by title."""
    out = {}
    for chunk in re.split(r"(?m)^## ", text)[1:]:
        title, _, body = chunk.partition("\n")
        out[title.strip()] = body
    return out


def results_part(title: str, body: str) -> str:
    """The part of a results section whose figures are checked: all of it, except Tests (only its paragraph on the
    CPU suite's size and time; the rest describes the GPU check's plan) and Presets' batch table (test_dry_run)."""
    if title == "Tests":
        [para] = [p for p in body.split("\n\n") if "the whole suite takes" in p]
        return para
    if title == "Presets":
        head, _, rest = body.partition(BATCH_TABLE)
        assert rest, "Presets' batch table moved: update BATCH_TABLE here and tests/test_dry_run.py"
        return head + rest.split("\n\n", 1)[1]
    return body


@dataclass(frozen=True)
class Number:
    section: str
    text: str  # as printed, e.g. "8,192", "4.80", "275.6M", "17x", "10%", "16m52s"
    value: float  # in the printed unit: 275.6M -> 275.6 (scale 1e6)
    decimals: int
    scale: tuple[float, ...] = (1.0,)  # what the printed value is multiplied by to compare (K: 1000 or 1024)
    percent: bool = False
    line: str = ""
    rounded: bool = False  # an integer that may be a rounding: "3 GiB" (3.07), not "16" (a micro-batch) or "9"


NUM = re.compile(r"(?<![\w.])(?<![A-Za-z]-)(−?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(e[-+]?\d+)?"
                 r"(\s?%|[KMB](?![A-Za-z])|x(?![\w]))?")
SCALES = {"K": (1000.0, 1024.0), "M": (1e6,), "B": (1e9,)}
QUOTED_OUTPUT = ("memory:", "MFU vs")  # code spans that quote the program's output: their figures count


@lru_cache(maxsize=None)
def _card_names() -> str:
    from tritonrun.presets import PRESETS

    models = sorted({m.group(0) for name in PRESETS for m in re.finditer(r"\d{4}", name)})
    return r"(?<![\w.])(?:" + "|".join(models) + r")(?![\d]|[,.]\d)"  # "RTX 4070", "a 3090 Ti": names, not figures


def prose(text: str) -> str:
    """README text without what is not a figure, line for line: code spans (paths, commands, flags; a span quoting
    the program's output stays), link targets, dates (of records, of files), record and issue numbers (#17),
    commits, architectures (sm_80/86), dimensions (2-D), card names (RTX 4070) and ordered-list markers."""
    def code(m: re.Match) -> str:
        return m.group(1) if m.group(1).startswith(QUOTED_OUTPUT) else " " + "\n" * m.group(1).count("\n")

    text = re.sub(r"`([^`]*)`", code, text)  # a span may run over a line break
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"\d{4}-\d{2}-\d{2}|\b\d{8}(?:-\d{6})?\b", " ", text)
    text = re.sub(r"(?<![\d.,])(?:11-10|12-17)(?![\d])", " ", text)  # the two records' dates, abbreviated
    text = re.sub(r"#\d+|\bcommit [0-9a-f]{7,40}\b", " ", text)
    text = re.sub(r"sm_\d+(?:/\d+)*|\b\d-D\b", " ", text)
    text = re.sub(_card_names(), " ", text)
    return re.sub(r"(?m)^[ \t]*\d+\.[ \t]", " ", text)


def numbers(title: str, part: str) -> list[Number]:
    out = []
    raws, lines = part.splitlines(), prose(part).splitlines()
    assert len(raws) == len(lines)
    for raw, line in zip(raws, lines):
        for m in re.finditer(r"(\d+)m(\d+)s\b", line):  # a duration, 16m52s
            out.append(Number(title, m.group(0), int(m.group(1)) + int(m.group(2)) / 60, 2, line=raw))
        line = re.sub(r"(\d+)m(\d+)s\b", " ", line)
        for m in NUM.finditer(line):
            sign, whole, frac, exp, suffix = m.groups()
            suffix = (suffix or "").strip()
            value = float(whole.replace(",", "") + (frac or "") + (exp or "")) * (-1 if sign else 1)
            if not suffix and re.match(r"-\d+(?:\.\d+)?[KMB]", line[m.end():]):  # "16-64K": K applies to both
                suffix = re.match(r"-\d+(?:\.\d+)?([KMB])", line[m.end():]).group(1)
            decimals = len(frac) - 1 if frac else 0
            unit = re.match(r"\s*(GiB|MiB|GB|MB|minutes|min)\b", line[m.end():])
            out.append(Number(title, m.group(0).rstrip(" %"), value, decimals, SCALES.get(suffix, (1.0,)),
                              suffix == "%", raw, bool(frac or suffix or unit)))
    return out


# ------------------------------------------------------------------------------------------- records named
def _pattern(name: str) -> re.Pattern:
    from tritonrun.presets import PRESETS

    rx = re.escape(name).replace(r"\*", r"[^/]*")  # re.escape leaves < and > as they are
    rx = rx.replace("<preset>", "(?:" + "|".join(PRESETS) + ")").replace("<date>", r"\d{8}(?:-\d{6})?")
    return re.compile(re.sub(r"<[a-z]+>", r"[^/]+", rx) + r"$")


def named_records(body: str) -> list[Path]:
    """The bench/results/*.json records a section names (inline, as a path or a bare file name; a name with
    `<preset>`, `<date>` or `*` in it: the newest record of each kind it matches)."""
    names = {n for n in re.findall(r"(?:bench/results/)?[\w.*<>-]+\.json", body)}
    found: dict[str, Path] = {}
    for name in names:
        rx = _pattern(name.removeprefix("bench/results/"))
        hits = sorted(p for p in RESULTS.glob("*.json") if rx.match(p.name))
        for p in hits:  # one per kind: the name without its date, the newest kept (sorted by date)
            found[re.sub(r"-\d{8}(?:-\d{6})?\.json$", "", p.name) if hits[1:] else p.name] = p
    return sorted(set(found.values()))


def _flat(obj, key: str = "", out: list | None = None) -> list[float]:
    """Every number a record holds: numeric fields (and GiB, MiB of *bytes* fields), numbers inside strings
    (versions "3.9.0" -> 3.9, used_by's "T=65536"), and of a list of rows its length and the count of each value of
    a field with few values (launches per arch, fitting launches)."""
    out = [] if out is None else out
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
        if "bytes" in key:
            out += [obj / GIB, obj / 2**20]
    elif isinstance(obj, str):
        out += [float(m.group(0)) for m in re.finditer(r"(?<![\w.])\d+(?:\.\d+)?", obj)]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flat(v, f"{key}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _flat(v, key, out)
        if obj and all(isinstance(v, dict) for v in obj):  # a list of rows: how many, and how many of each kind
            out.append(float(len(obj)))
            for k in {k for v in obj for k, x in v.items() if isinstance(x, (bool, str))}:
                kinds = Counter(v.get(k) for v in obj)
                if len(kinds) <= 8:
                    out += [float(c) for c in kinds.values()]
    return out


@lru_cache(maxsize=None)
def record_values(paths: tuple[Path, ...]) -> frozenset[float]:
    return frozenset(v for p in paths for v in _flat(json.loads(p.read_text())))


@lru_cache(maxsize=None)
def config_values() -> frozenset[float]:
    """The code's own values: presets (and their variants' peaks), run defaults, each recipe's defaults, token
    budget and its source line, every model config of every recipe (with its derived sizes), the memory fit's
    constants."""
    from tritonrun import memory
    from tritonrun.defaults import RUN_DEFAULTS, SMOKE_DEFAULTS
    from tritonrun.presets import PRESETS, VARIANT_PEAK_TFLOPS, fp8_peak_tflops_for
    from tritonrun.recipes import RECIPES

    things: list = [dataclasses.asdict(p) for p in PRESETS.values()]
    things += [{name: fp8_peak_tflops_for(name) for name, p in PRESETS.items() if p.arch}]  # None: no FP8
    things += [VARIANT_PEAK_TFLOPS, RUN_DEFAULTS, SMOKE_DEFAULTS,
               {"fragmentation": memory.FRAGMENTATION, "budget_margin_bytes": memory.BUDGET_MARGIN,
                "context_allowance_bytes": memory.CONTEXT_ALLOWANCE}]
    from tritonrun.gpt2 import speedrun89 as s89
    from tritonrun.recipes import record89_optim as o89

    # record #89's schedule, optimizer tables and head constants (its recipe's numbers live beside their source lines)
    plan = s89.Schedule89()
    facts = {"untie_step": plan.untie_step, "tokens": plan.tokens(), "logged_steps": s89.LOG_SCHEDULE.total_steps,
             "parameters": s89.parameter_count(), "logit": [s89.LOGIT_A, s89.LOGIT_B, s89.LOGIT_C]}
    things += [dataclasses.asdict(plan), facts, o89.ADAM_DEFAULTS, o89.NORMUON_DEFAULTS, o89.ADAM_TABLE,
               o89.MLP_CPROJ_LR_MUL]
    for recipe in RECIPES.values():
        things += [recipe.defaults(on_gpu=True), recipe.defaults(on_gpu=False), recipe.tokens_to_target,
                   recipe.tokens_source]
        for cfg in recipe.sizes().values():
            props = [n for n in dir(type(cfg)) if isinstance(getattr(type(cfg), n), property)]
            things += [dataclasses.asdict(cfg), {n: getattr(cfg, n) for n in props}]
    return frozenset(_flat(things))


def matches(n: Number, values) -> bool:
    """`n` as printed is `value` rounded to the printed decimals (for n%: 100 x value, or value itself); a plain
    integer (no decimals, unit or suffix: a count, a step, a size) only an integer value, exactly."""
    if not n.rounded:
        return n.value in values
    half = 0.5 * 10.0**-n.decimals * (1 + 1e-9)
    wants = [n.value * s for s in n.scale] + ([n.value / 100] if n.percent else [])
    return any(abs(v - w) <= half * (w / n.value if n.value else 1) for w in wants for v in values)


# ------------------------------------------------------------------------- figures with a formula or a home
@lru_cache(maxsize=None)
def models() -> dict:
    """d12 of each recipe on the meta device: shapes only."""
    import torch

    from tritonrun.gpt2.config import MODEL_SIZES
    from tritonrun.gpt2.model import GPT
    from tritonrun.gpt2.speedrun import DENSE_1110, SPEEDRUN_MODELS, SpeedrunConfig, SpeedrunGPT

    with torch.device("meta"):
        return {"gpt2": GPT(MODEL_SIZES["d12"]), "speedrun": SpeedrunGPT(SPEEDRUN_MODELS["d12"]),
                "speedrun-dense": SpeedrunGPT(SpeedrunConfig(**DENSE_1110))}


def matmul_parameters(kind: str) -> int:
    """M of SpeedrunGPT.flops_per_token (6 M + attention), read back from the function README names: at seq_len 1
    (window 1) the attention term is 12 L H D for the window model, 6 L H D for the dense one."""
    m = models()[kind]
    c = m.config
    attention = (12 if c.attention == "window" else 6) * c.attention_layers * c.n_head * c.head_dim
    return (m.flops_per_token(1, 1) - attention) // 6


@lru_cache(maxsize=None)
def window_flops(kind: str) -> float:
    """Per token per head at T = 65,536, window 1,792, D = 128 (sm_89 tiles): 'dense' = 4 D T / 2, 'fwd' = what
    the window kernel's forward executes (window_attention.executed_flops)."""
    import torch

    from tritonrun.kernels import window_attention as wa

    T, window, D = 65_536, 1_792, 128
    if kind == "dense":
        return 4 * D * T / 2
    cu = torch.tensor([0, T], dtype=torch.int32)
    return wa.executed_flops(cu, T, window, D, {k: wa.CONFIGS["sm_89"][k][D] for k in wa.KERNELS})[kind] / T


@lru_cache(maxsize=None)
def newton_schulz() -> dict[str, float]:
    """tritonrun/kernels/muon.py's docstring arithmetic: one Newton-Schulz step of an m x n matrix (m <= n) costs
    4 m^2 n + 2 m^3 FLOPs, of which a one-triangle X X^T and A A save m^2 n + m^3; d12 has per layer 4 square
    768 x 768 matrices and 2 of 768 x 3072, 5 steps per optimizer step; a training step is 524,288 tokens x the
    2024-11-10 d12's flops_per_token(1024)."""
    from tritonrun.defaults import RUN_DEFAULTS

    mats = 12 * [(768, 768)] * 4 + 12 * [(768, 3072)] * 2
    cost = 5 * sum(4 * m * m * n + 2 * m**3 for m, n in mats)
    saved = 5 * sum(m * m * n + m**3 for m, n in mats)
    step = RUN_DEFAULTS["total_batch_tokens"] * models()["speedrun-dense"].flops_per_token(1024)
    return {"share": 100 * cost / step, "saved_fraction": 100 * saved / cost, "saving": 100 * saved / step}


# The recipe table's batches on rtx4070 with --backend triton (the memory records' picks: Presets' table)
RTX4070_RUNS = {"gpt2": 1024, "speedrun-dense": 1024, "speedrun": 8192, "record89": 4096}


@lru_cache(maxsize=None)
def recipe_flops(name: str) -> int:
    """The recipe's flops_per_token (Recipe.flops_per_token) for its GPU run on rtx4070 (--backend triton; record89
    with --fp8 on), the d12 model on the meta device."""
    from types import SimpleNamespace

    import torch

    from tritonrun.recipes import get_recipe

    recipe = get_recipe(name)
    defaults = recipe.defaults(on_gpu=True)
    cfg = SimpleNamespace(gpu="rtx4070", fp8="on", max_steps=defaults["max_steps"], seq_len=RTX4070_RUNS[name],
                          warmup_steps=defaults.get("warmup_steps", 0), lr=1.0)
    with torch.device("meta"):
        model = models()[name] if name in models() else recipe.model_for(recipe.sizes()["d12"])
    if recipe.fp8:
        model.fp8 = True  # what --fp8 on builds (the flag needs the Triton kernels; the FLOPs only read it)
    return recipe.flops_per_token(model, cfg)


def projected_hours(name: str) -> float:
    from tritonrun.presets import PRESETS
    from tritonrun.recipes import get_recipe

    peak = PRESETS["rtx4070"].peak_tflops * 1e12
    return get_recipe(name).tokens_to_target * recipe_flops(name) / (peak * 0.45) / 3600


def _in_file(path: str, pattern: str) -> Callable[[], bool]:
    return lambda: re.search(pattern, (REPO / path).read_text()) is not None


def _record(name: str):
    return json.loads((RESULTS / name).read_text())


def _named(section: str, pattern: str, text: str | None = None) -> str:
    """The one record of `pattern` (a file-name regex) that README's `section` names."""
    [name] = set(re.findall(rf"bench/results/({pattern})", sections(text or README.read_text())[section]))
    return name


def _ada(text: str | None = None) -> str:
    return _named("Ada fit", r"ada-\d{8}\.json", text)


@dataclass(frozen=True)
class Figure:
    """A figure no named record holds as printed, by kind:
      derived, projection  arithmetic on other figures (`how`); README labels it and gives the formula (`label`)
      measured             no record holds it: README says where, when and at which commit (`label`)
      computed             a value of the code computed by the function README names (a parameter count)
      config               a value of the code or of the tests README describes, found where `found` looks
      formula              a constant of a formula README prints, found in the code's statement of it
      external             a hardware or library fact, or others' figure, found where the code cites it
      example              an example value of a flag
    `value` recomputes it (the printed text must be its rounding); `found` checks where it is defined; `label`
    must stand in the section, beside it."""
    section: str
    text: str
    kind: str
    how: str
    value: Callable[[], float] | None = None
    found: Callable[[], bool] | None = None
    label: str | None = None
    near: str | None = None  # where one text stands for two figures: a word of the figure's own README line


def _value_blocks() -> list[int]:
    from tritonrun.gpt2.speedrun import SPEEDRUN_MODELS

    return [i for i, t in enumerate(SPEEDRUN_MODELS["d12"].value_embed_layers) if t is not None]


FIGURES = [
    # ---- Where each op runs today: MFU's FLOPs, from the models (tritonrun/gpt2/speedrun.py flops_per_token)
    Figure("Where each op runs today", "6", "formula", "llm.c's 6·N + 6·L·C·T and 6 x matmul parameters",
           found=_in_file("tritonrun/gpt2/speedrun.py", r"6 = 2 \(multiply-add\) x 3")),
    Figure("Where each op runs today", "12", "formula", "12·H·D FLOPs per attended pair",
           found=_in_file("tritonrun/gpt2/speedrun.py", r"12 \* H \* D")),
    Figure("Where each op runs today", "123.5M", "computed", "matmul parameters of the 2024-11-10 d12",
           value=lambda: matmul_parameters("speedrun-dense"),
           label="(`SpeedrunGPT.flops_per_token`) counts 6 × its matmul parameters"),
    Figure("Where each op runs today", "121.2M", "computed", "matmul parameters of the 2024-12-17 d12",
           value=lambda: matmul_parameters("speedrun"),
           label="(`SpeedrunGPT.flops_per_token`) counts 6 × its matmul parameters"),
    Figure("Where each op runs today", "797.8M", "computed", "SpeedrunGPT(2024-11-10 d12).flops_per_token(1024)",
           value=lambda: models()["speedrun-dense"].flops_per_token(1024),
           label="(`SpeedrunGPT.flops_per_token`) counts 6 × its matmul parameters"),
    # ---- Presets
    Figure("Presets", "8", "example", "--memory-gib 8, an example value",
           found=lambda: "`--memory-gib 8` sizes for an 8 GB card" in README.read_text(), near="--memory-gib 8"),
    Figure("Presets", "275.6M", "computed", "SpeedrunGPT(d12).num_parameters(), the model's size",
           value=lambda: models()["speedrun"].num_parameters()),
    Figure("Presets", "3.8", "derived", "(parameters + grads + optimizer_state bytes) / 2**30 of the record",
           value=lambda: sum(_record(_named("Presets", r"memory-speedrun-packed-rtx4070-\d{8}\.json"))["split_bytes"][k]
                             for k in ("parameters", "grads", "optimizer_state")) / GIB,
           label="derived: parameters + grads + optimizer state of the record"),
    Figure("Presets", "512", "formula", "GeForce peak = SMs x boost clock x 512 FLOP/clock/SM",
           found=_in_file("tritonrun/presets.py", r"SMs x boost clock x 512 FLOP/clock/SM")),
    Figure("Presets", "8", "external", "an RTX 4070 Laptop GPU has 8 GB (presets.py)",
           found=_in_file("tritonrun/presets.py", r"an RTX 4070 Laptop GPU has 8 GB"), near="Laptop"),
    Figure("Presets", "0.3", "external", "CUDA context size, others' measurement (memory.py CONTEXT_ALLOWANCE)",
           found=_in_file("tritonrun/memory.py", r"0\.3-0\.5 GiB measured\s*\n#\s+on consumer cards by others"),
           label="by others' measurements on consumer cards"),
    Figure("Presets", "11.5", "derived", "--memory-gib 12 - the 0.5 GiB context allowance",
           value=lambda: 12 - _record("memory-rtx4070-20261203.json")["context_allowance_bytes"] / GIB,
           label="the budget minus a 0.5 GiB"),
    Figure("Presets", "11.99", "external", "what a 12 GB RTX 4070 reports (memory.py)",
           found=_in_file("tritonrun/memory.py", r"RTX 4070 reports 11\.99 GiB")),
    Figure("Presets", "256", "external", "the autotuners' L2 flush buffer (training.py)",
           found=_in_file("tritonrun/training.py", r"a 256 MB L2 flush")),
    # ---- Memory
    Figure("Memory", "48", "derived", "FlashAttention-2's fp32 dq accumulator: 16 x 1,024 x 768 x 4 B in MiB",
           value=lambda: 16 * 1024 * 768 * 4 / 2**20, label="derived: 16 × 1,024 × 768 fp32"),
    # ---- Recipes
    Figure("Recipes", "124M", "computed", "GPT-2 124M, the model's name: GPT(d12).num_parameters() = 124.4M",
           value=lambda: models()["gpt2"].num_parameters(include_padding=False)),
    *(Figure("Recipes", str(b), "config", "a block with a value table (SpeedrunConfig.value_embed_layers)",
             found=lambda: _value_blocks() == [0, 1, 2, 9, 10, 11], near="blocks 9, 10, 11") for b in (9, 10, 11)),
    Figure("Recipes", "896", "derived", "the window at mid-run: 128 * int((0.5 * 64 + 0.5 * 1792 + 64) // 128)",
           value=lambda: 128 * int((0.5 * 64 + 0.5 * 1792 + 64) // 128),
           label="128 × int(((1 − f)·64 + f·1792 + 64) // 128) tokens, f = step / `--max-steps`"),
    Figure("Recipes", "14", "derived", "the final window in blocks: 1,792 / 128",
           value=lambda: models()["speedrun"].config.final_window / 128, label="same in blocks (1 → 14)"),
    Figure("Recipes", "131", "derived", "the record's training wall time: sum of its runs' wall_s / 60",
           value=lambda: sum(r["wall_s"] for runs in _record(_named("Recipes", r"recipes-cpu-[\d-]+\.json(?=`\s+\()"))
                             ["sweep"].values() for r in runs) / 60,
           label="derived: the sum of its runs' `wall_s`"),
        # ---- Recipes: the side-by-side table (FLOPs per token computed, the 4070 time a labelled projection)
    *(Figure("Recipes", text, "computed", f"{name}'s flops_per_token as run on rtx4070 (--backend triton)",
             value=(lambda name=name: recipe_flops(name)), near=f"| {name} |")
      for name, text in (("gpt2", "803.3M"), ("speedrun-dense", "797.8M"), ("speedrun", "814.3M"),
                         ("record89", "683.5M"))),
    *(Figure("Recipes", text, "projection", f"{name}: tokens_to_target x FLOPs per token / (58.3e12 x 0.45) in h",
             value=(lambda name=name: projected_hours(name)), near=f"| {name} |",
             label="tokens to 3.28 × FLOPs per token / (58.3 TFLOPS × 0.45)")
      for name, text in (("gpt2", "76.5"), ("speedrun-dense", "13.3"), ("speedrun", "6.7"), ("record89", "2.6"))),
    Figure("Recipes", "0.45", "formula", "the assumed MFU of the recipe table's projection",
           found=lambda: "the 0.45 an assumed MFU" in README.read_text()),
    # ---- Ada fit (its launch counts are the records' row counts: check_prose_figures)
    Figure("Ada fit", "250", "config", "bench/ada.py REGISTER_HEADROOM",
           found=_in_file("bench/ada.py", r"REGISTER_HEADROOM = 250\b")),
    Figure("Ada fit", "255", "external", "registers per thread, the hardware maximum (bench/ada.py)",
           found=_in_file("bench/ada.py", r"255 is the hardware maximum")),
    # ---- Tests: what the named tests do, and the suite's one measurement
    Figure("Tests", "124,439,808", "computed", "GPT(d12).num_parameters(include_padding=False)",
           value=lambda: models()["gpt2"].num_parameters(include_padding=False)),
    Figure("Tests", "2", "config", "2 gloo ranks (tests/test_ddp.py), 2 cores of the development machine",
           found=_in_file("tests/test_ddp.py", r'"--nproc_per_node", "2"')),
    Figure("Tests", "20", "config", "the 20-step curves (max_steps=20 in tests/test_recipe*.py)",
           found=lambda: all(_in_file(f, r"max_steps=20\b")() for f in ("tests/test_recipe.py",
                                                                         "tests/test_recipe_packed.py"))),
    Figure("Tests", "3", "config", "CU of tests/test_speedrun_window_model.py: 3 documents",
           value=lambda: len(json.loads(re.search(r"^CU = (\[[\d, ]+\])", (REPO / "tests/test_speedrun_window_model.py")
                                            .read_text(), re.M).group(1))) - 1),
    Figure("Tests", "1,429", "measured", "the suite's size, measured 2026-12-08 (no record: labelled)",
           label="measured 2026-12-08 on the 2-core development machine, `.ci/run` in a fresh clone at commit 9958b27"),
    Figure("Tests", "21m58s", "measured", "the suite's wall time, measured 2026-12-08 (no record: labelled)",
           label="measured 2026-12-08 on the 2-core development machine, `.ci/run` in a fresh clone at commit 9958b27"),
    Figure("Tests", "22", "derived", "21m58s in minutes, rounded", value=lambda: 21 + 58 / 60,
           label="about 22 minutes (measured"),
    # ---- Status
    Figure("Status", "17x", "derived", "16,777,216 / 969,600", value=lambda: window_flops("dense") /
           window_flops("fwd"), label="derived, not measured: 16,777,216 / 969,600"),
    Figure("Status", "16,777,216", "derived", "dense causal forward FLOPs per token per head: 4 D T / 2",
           value=lambda: window_flops("dense"), label="(its `executed_flops`, tested)"),
    Figure("Status", "969,600", "derived", "window forward executed FLOPs per token per head (executed_flops)",
           value=lambda: window_flops("fwd"), label="(its `executed_flops`, tested)"),
    Figure("Status", "0.1", "derived", "one-triangle saving: NS FLOPs saved / training-step FLOPs, in %",
           value=lambda: newton_schulz()["saving"], label="derived, not measured"),
    Figure("Status", "30", "derived", "share of Newton-Schulz FLOPs a one-triangle kernel saves, in %",
           value=lambda: newton_schulz()["saved_fraction"], label="derived, not measured"),
    Figure("Status", "0.39", "derived", "Newton-Schulz FLOPs / training-step FLOPs, in %",
           value=lambda: newton_schulz()["share"], label="derived, not measured"),
]


def _figure_for(n: Number) -> Figure | None:
    return next((f for f in FIGURES if f.section == n.section and f.text == n.text
                 and (f.near is None or f.near in n.line)), None)


# --------------------------------------------------------------------------------------------- the checks
def classify(text: str) -> tuple[list[tuple[Number, str, str]], list[str]]:
    """Every number of every results section with its category (figure kind, "record" or "config") and source;
    and the problems: numbers nothing accounts for. A number is looked up in the records its paragraph names, or,
    where the paragraph names none, in those its section names (and those of a section it refers to)."""
    secs = sections(text)
    missing = [t for t in RESULTS_SECTIONS if t not in secs]
    assert not missing, f"README lost results sections {missing}: update RESULTS_SECTIONS"
    done, problems = [], []
    for title in RESULTS_SECTIONS:
        body = secs[title]
        sources = named_records(body)
        for other, phrase in [REFERS[title]] if title in REFERS else []:
            assert phrase in body, f"{title} no longer says {phrase!r}: update REFERS"
            sources += named_records(secs[other])
        for para in results_part(title, body).split("\n\n"):
            named = tuple(sorted(set(named_records(para) or sources)))  # a paragraph naming a record: that one
            for n in numbers(title, para):
                fig = _figure_for(n)
                if fig is not None:
                    done.append((n, fig.kind, fig.how))
                elif matches(n, record_values(named)):
                    done.append((n, "record", ", ".join(p.name for p in named)))
                elif matches(n, config_values()):
                    done.append((n, "config", "tritonrun's presets, defaults, recipes, model configs"))
                else:
                    problems.append(f"{title}: {n.text!r} is in no record the section (or its paragraph) names, no "
                                    f"config value, and not in FIGURES (line: {n.line.strip()[:150]})")
    return done, problems


def check_figures(text: str) -> list[str]:
    """Each FIGURES entry is printed in its section, recomputes to what is printed, is found where it says, and
    carries its label."""
    secs, problems = sections(text), []
    for f in FIGURES:
        part = results_part(f.section, secs[f.section])
        printed = [dataclasses.replace(n, rounded=True) for n in numbers(f.section, part)
                   if n.text == f.text and (f.near is None or f.near in n.line)]
        if not printed:
            problems.append(f"{f.section}: FIGURES lists {f.text!r} ({f.how}), which README no longer prints")
            continue
        if f.value is not None and not matches(printed[0], [float(f.value())]):
            problems.append(f"{f.section}: {f.text!r} is not {f.how} = {f.value()!r}")
        if f.found is not None and not f.found():
            problems.append(f"{f.section}: {f.text!r}: its definition ({f.how}) is not where FIGURES says")
        if f.label is not None and " ".join(f.label.split()) not in " ".join(part.split()):
            problems.append(f"{f.section}: {f.text!r} lost its label {f.label!r}")
        if f.kind in ("derived", "projection", "measured") and f.label is None:
            problems.append(f"{f.section}: {f.text!r} is {f.kind}: README must label it (FIGURES' label)")
        if f.kind != "measured" and f.value is None and f.found is None:
            problems.append(f"{f.section}: {f.text!r} ({f.kind}) has neither a formula nor a home")
    return problems


def _table(part: str, header_start: str) -> list[list[str]]:
    lines = part.split(header_start, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in lines]


def check_tables(text: str) -> list[str]:
    """Row by row, the tables whose cells are one record's fields (or the code's): a cell edited is caught even
    where the new value happens to be some other record field."""
    secs, problems = sections(text), []
    split = ("parameters", "grads", "optimizer_state", "activations", "temporaries")

    def estimate_row(rec: dict, cells: list[str], key: dict, where: str):
        [est] = [e for e in rec["estimates"] if all(e.get(k) == v for k, v in key.items())] or [None]
        if est is None:
            problems.append(f"{where}: no estimate {key} in the record")
            return
        want = [est["peak_bytes"], est["peak_reserved_estimate_bytes"], *(est["split_bytes"][c] for c in split)]
        got = cells[-8:-1]
        if [f"{b / GIB:.2f}" for b in want] != got or cells[-1] != ("yes" if est["fits"] else "no"):
            problems.append(f"{where}: {cells} != record {[f'{b / GIB:.2f}' for b in want]}, fits {est['fits']}")

    memory = secs["Memory"]
    rec = _record("memory-rtx4070-20261203.json")
    assert "Record `bench/results/memory-rtx4070-20261203.json`" in memory
    for cells in _table(memory, "| backend | micro-batch | peak live |"):
        estimate_row(rec, cells, {"backend": cells[0], "micro_batch": int(cells[1])}, "Memory table 1")
    prefix = {"speedrun": "memory-speedrun-packed-rtx4070-20261207.json",
              "speedrun-dense": "memory-speedrun-dense-rtx4070-20261207.json"}
    for cells in _table(memory, "| recipe | backend | tokens per micro-batch |"):
        assert prefix[cells[0]].removesuffix(".json") in memory
        mb, seq = (int(v.replace(",", "")) for v in cells[2].split("×"))
        estimate_row(_record(prefix[cells[0]]), cells, {"backend": cells[1], "micro_batch": mb, "seq_len": seq},
                     "Memory table 2")
    picks = re.search(r"Largest micro-batch that fits, torch / triton, by each preset's record\s*"
                      r"\(`bench/results/memory-<preset>-(\d{8})\.json`\):(.*?): what", memory, re.S)
    from tritonrun.presets import PRESETS

    listed = dict((p, (int(a), int(b))) for p, a, b in re.findall(r"(\w+) (\d+) / (\d+)", picks.group(2)))
    assert set(listed) == set(PRESETS) - {"cpu"}, listed
    for preset, (torch_mb, triton_mb) in listed.items():
        r = json.loads((RESULTS / f"memory-{preset}-{picks.group(1)}.json").read_text())["max_micro_batch"]
        if (r["torch"]["micro_batch"], r["triton"]["micro_batch"]) != (torch_mb, triton_mb):
            problems.append(f"Memory: {preset} {torch_mb} / {triton_mb} != its record's picks")

    presets = secs["Presets"]
    from tritonrun.presets import fp8_peak_tflops_for

    for cells in _table(presets, "| preset | memory | peak bf16 TFLOPS (MFU) | peak FP8 TFLOPS |"):
        p = PRESETS[cells[0]]
        fp8 = fp8_peak_tflops_for(cells[0]) if p.arch else None
        want = ([f"{p.memory_gib:g} GiB", f"{p.peak_tflops:g}", "—" if fp8 is None else f"{fp8:,g}",
                 f"{p.arch}, {p.sm_count} SMs"] if p.arch else ["—", "—", "—", "—"]) + \
            [p.dtype, p.backend, "yes" if p.compile else "no"]
        got = [cells[1], cells[2].rstrip("0").rstrip(".") if "." in cells[2] else cells[2], cells[3], cells[4],
               cells[5], cells[6].rstrip("*"), cells[7]]
        if got != want:
            problems.append(f"Presets table: {cells} != PRESETS[{cells[0]!r}] {want}")

    recipes = secs["Recipes"]
    [name] = re.findall(r"Record `bench/results/(recipes-cpu-[\d-]+\.json)`", recipes)
    ab = _record(name)
    for cells in _table(recipes, "| recipe | parameters | lrs swept"):
        recipe = cells[0].split(" (")[0]
        run, sweep = ab["ab"][recipe], ab["sweep"][recipe]
        lrs = [float(v.strip("× *")) for v in cells[2].split(",")]
        best = [float(v.strip("× *")) for v in cells[2].split(",") if "**" in v]
        minus = ab["result"]["minus_gpt2"].get(recipe)
        want = [f"{run['parameters']:,}", sorted(s["lr"] for s in sweep), [run["lr"]], f"{run['final_val_loss']:.4f}",
                "" if minus is None else f"{minus:.4f}".replace("-", "−")]
        if [cells[1], lrs, best, cells[3], cells[4]] != want:
            problems.append(f"Recipes A/B table: {cells} != {name} {want}")
    return problems


def check_prose_figures(text: str) -> list[str]:
    """Figures the bag check alone would let through: counts in Ada fit's words, the rtx4070 batch per recipe in
    Recipes (the same picks as Presets' table)."""
    secs, problems = sections(text), []
    ada = secs["Ada fit"]
    recs = _record(_ada(text))
    tight = sum(r["arch"] == "sm_89" and r["registers"] >= 250 for r in recs)
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    said = re.search(r"(\w+) sm_89 rows at 250\+ of 255 registers", " ".join(ada.split()))
    if said is None or said.group(1) not in (str(tight), words[tight] if tight < len(words) else None):
        problems.append(f"Ada fit: README says {said and said.group(1)!r} sm_89 rows at 250+ registers, "
                        f"{_ada(text)} has {tight}")
    sm89 = sum(r["arch"] == "sm_89" for r in recs)
    said = re.search(r"All (\d+) Triton kernel launches that the sm_89 presets", ada)
    if said is None or int(said.group(1)) != sm89:
        problems.append(f"Ada fit: README says {said and said.group(0)!r}, {_ada(text)} has {sm89} sm_89 launches")
    old = _record(_named("Ada fit", r"ada-triton3\.6-\d{8}\.json", text))
    said = re.search(r"(\d+) launches, also under Triton 3\.6", ada)
    if said is None or int(said.group(1)) != len(old):
        problems.append(f"Ada fit: README says {said and said.group(0)!r}, the Triton 3.6 record has {len(old)}")
    fitting = sum(r["fits"] for r in recs)
    said = re.search(r"(\d+) of (\d+) launches", ada)
    if said is None or said.groups() != (str(fitting), str(len(recs))):
        problems.append(f"Ada fit: README says {said and said.group(0)!r}, {fitting} of the {len(recs)} launches "
                        f"of {_ada(text)} fit")
    from tests.test_dry_run import recorded_pick

    recipes = " ".join(secs["Recipes"].split())
    dense_t, dense_f = recorded_pick("speedrun-dense", "torch"), recorded_pick("speedrun-dense", "triton")
    pack_t, pack_f = recorded_pick("speedrun", "torch"), recorded_pick("speedrun", "triton")
    tokens = 524_288
    for want in (f"rtx4070 {pack_t:,} or {pack_f:,} tokens",
                 f"rtx4070: {dense_t} × 1024 × {tokens // 1024 // dense_t} with the torch LM head, "
                 f"{dense_f} × 1024 × {tokens // 1024 // dense_f} with `--backend triton`",
                 f"`speedrun` {tokens // pack_f} packed sequences of {pack_f:,} tokens under `--backend triton` "
                 f"({tokens // pack_t} of {pack_t:,} with the torch LM head)",
                 f"`speedrun-dense` {tokens // 1024 // dense_f} micro-batches of {dense_f} sequences "
                 f"({tokens // 1024 // dense_t} of {dense_t} with the torch LM head)",
                 f"h100: {tokens // recorded_pick('speedrun', 'triton', 'h100')} × "
                 f"{recorded_pick('speedrun', 'triton', 'h100'):,}"):
        if want not in recipes:
            problems.append(f"Recipes: README does not say {want!r} (the memory records' picks)")
    return problems


CHECKS = (lambda t: classify(t)[1], check_figures, check_tables, check_prose_figures)


# ---------------------------------------------------------------------------------------------- the tests
def test_every_results_figure_has_a_source():
    """Every number of every results section: in a record the section names, a value of the code, or listed in
    FIGURES."""
    _, problems = classify(README.read_text())
    assert not problems, "\n".join(problems)


def test_derived_figures_recompute_and_say_so():
    problems = check_figures(README.read_text())
    assert not problems, "\n".join(problems)


def test_tables_equal_their_records_row_by_row():
    problems = check_tables(README.read_text())
    assert not problems, "\n".join(problems)


def test_prose_counts_and_batches_equal_their_records():
    problems = check_prose_figures(README.read_text())
    assert not problems, "\n".join(problems)


def test_the_batch_table_left_out_is_test_dry_runs():
    """Presets' batch table is checked cell by cell against the memory records by tests/test_dry_run.py (the same
    header), so this file leaves it out rather than check it twice."""
    from tests import test_dry_run

    assert BATCH_TABLE in Path(test_dry_run.__file__).read_text()
    assert callable(test_dry_run.test_readme_batch_table_is_the_memory_records_picks)
    assert BATCH_TABLE in sections(README.read_text())["Presets"]


def test_status_claims_what_this_file_checks():
    """The Status line promises what this file enforces, section by section, and names it."""
    status = " ".join(sections(README.read_text())["Status"].split())
    assert "tests/test_readme_numbers.py" in status
    for title in RESULTS_SECTIONS:
        assert title in status, title


# Each mutation bumps the last digit of the figure its pattern's group 1 captures (a word: another number word),
# or, with a third field, puts that text in place of group 1: a new figure nothing sources.
MUTATIONS = [
    ("Memory", r"^\| triton \| 16 \| [\d.]+ \| ([\d.]+) \|"),  # a table cell: reserved est.
    ("Memory", r"^\| speedrun \| torch \| [^|]+\| [\d.]+ \| ([\d.]+) \|"),
    ("Memory", r"\(([\d.]+) GiB\s+estimated\)"),  # prose quoting the table
    ("Memory", r"rtx3090 \d+ / (\d+)"),
    ("Memory", r"fragmentation allowance(\))", ", 2.22 GiB)"),
    ("Presets", r"^\| rtx4070 \| [^|]+\| ([\d.]+) \|"),
    ("Presets", r"([\d.]+) GiB of activations"),
    ("Presets", r"take ([\d.]+) GiB"),
    ("Presets", r"an NVL part (\d+)"),
    ("Recipes", r"^\| speedrun-dense [^|]+\|[^|]+\|[^|]+\| ([\d.]+) \|"),  # final val loss
    ("Recipes", r"^\| speedrun \([^|]+\| ([\d,]+) \|"),  # parameters
    ("Recipes", r"speedrun-dense ([\d.]+)\s+against gpt2"),
    ("Recipes", r"\((\d+) training-minutes"),
    ("Recipes", r"rtx4070 ([\d,]+) or [\d,]+ tokens"),
    ("Ada fit", r"All (\d+) Triton kernel launches"),
    ("Ada fit", r"(\d+) of \d+ launches in all"),
    ("Ada fit", r"(\w+) sm_89 rows at 250\+"),
    ("Status", r"(\d+)x fewer"),
    ("Status", r"/ ([\d,]+) forward FLOPs"),
    ("Status", r"~([\d.]+) % of a d12 step"),
    ("Tests", r"parameter count \(([\d,]+)\)"),
    ("Tests", r"tests in (\d+)m\d+s"),
    ("Where each op runs today", r"\(([\d.]+)M FLOPs per token"),
    ("Where each op runs today", r"([\d.]+)M for `speedrun`"),
]


def _bump(figure: str) -> str:
    if figure.isalpha():
        return "eight" if figure != "eight" else "nine"
    i = max(k for k, ch in enumerate(figure) if ch.isdigit())
    return figure[:i] + str((int(figure[i]) + 1) % 10) + figure[i + 1:]


@lru_cache(maxsize=2)
def all_problems(text: str) -> frozenset[str]:
    return frozenset(p for check in CHECKS for p in check(text))


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_a_changed_figure_fails(mutation):
    """The checks catch an edited figure: each mutation of README's text (a figure changed in its own section, or
    one added) raises a problem the README as it is does not have."""
    section, pattern, *put = mutation
    text = README.read_text()
    body = sections(text)[section]
    m = re.search(pattern, body, re.M)
    assert m and m.group(1), f"{section}: no {pattern!r}: update MUTATIONS"
    new = put[0] if put else _bump(m.group(1))
    mutated = text.replace(body, body[:m.start(1)] + new + body[m.end(1):], 1)
    assert mutated != text
    assert all_problems(mutated) - all_problems(text), f"{m.group(0)!r}: {m.group(1)!r} -> {new!r} went unnoticed"
