"""Hugging Face and llm.c interop: against transformers itself, and against an llm.c file written here by hand."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonrun.gpt2.checkpoint import CheckpointError, save_checkpoint
from tritonrun.gpt2.config import GPTConfig
from tritonrun.gpt2.hf import HFFormatError, init_from, load_hf, save_hf
from tritonrun.gpt2.hf import main as hf_cli
from tritonrun.gpt2.llmc import LlmcFormatError, load_llmc, save_llmc
from tritonrun.gpt2.model import GPT
from tritonrun.gpt2.speedrun import SpeedrunGPT
from tests.helpers import ONE_THREAD_ENV, save_speedrun_checkpoint, tiny_speedrun

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install transformers)")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = ONE_THREAD_ENV


pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: same math, different kernels/summation order
TINY = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)


def perturb_(model, seed):
    """Non-trivial biases and LayerNorm params (defaults are 0 / 1), so every term of the mapping is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.abs().max() == 1 else 0.0))
    return model


def our_model(seed=0, config=TINY):
    torch.manual_seed(seed)
    return perturb_(GPT(config), seed).eval()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257,
                                  activation_function="gelu_new")
    return perturb_(transformers.GPT2LMHeadModel(cfg), 1).eval()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf_model.save_pretrained(path)  # safetensors
    return path


def idx_batch(block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (3, min(block_size, 41)), generator=g)


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)


# ------------------------------------------------------------------------------------- HF -> ours


def test_load_hf_matches_transformers(hf_model, hf_dir):
    assert (hf_dir / "model.safetensors").is_file()
    model = load_hf(hf_dir)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.padded_vocab_size) == (2, 4, 64, 128,
                                                                                              50257, 50304)
    wte = model.transformer.wte.weight
    assert torch.equal(wte[:50257], hf_model.transformer.wte.weight)
    assert not wte[50257:].any()  # padded rows are zero
    idx = idx_batch(128)
    logits = our_logits(model, idx)
    assert logits.shape == (3, 41, 50257)
    torch.testing.assert_close(logits, hf_logits(hf_model, idx), **TOL)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_hf_openai_layout(hf_model, hf_dir, tmp_path, fmt):
    """OpenAI's `gpt2` on the Hub: no "transformer." prefix, causal-mask buffers h.{i}.attn.bias stored."""
    sd = {k.removeprefix("transformer."): v.clone() for k, v in load_file(hf_dir / "model.safetensors").items()}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(k.startswith("transformer.") for k in sd)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    if fmt == "safetensors":
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    idx = idx_batch(128)
    torch.testing.assert_close(our_logits(load_hf(tmp_path), idx), hf_logits(hf_model, idx), **TOL)


def test_load_hf_tied_lm_head_stored(hf_model, tmp_path):
    """A full state_dict (lm_head.weight present, equal to wte) in pytorch_model.bin also loads."""
    hf_model.config.to_json_file(tmp_path / "config.json")
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    assert "lm_head.weight" in torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    idx = idx_batch(128)
    torch.testing.assert_close(our_logits(load_hf(tmp_path), idx), hf_logits(hf_model, idx), **TOL)


def test_load_hf_sharded(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="5MB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    idx = idx_batch(128)
    torch.testing.assert_close(our_logits(load_hf(tmp_path), idx), hf_logits(hf_model, idx), **TOL)


def test_load_hf_half_precision_file_becomes_fp32(hf_dir, tmp_path):
    _copy_dir(hf_dir, tmp_path)
    _edit_weights(tmp_path, lambda sd: sd.update({k: v.half() for k, v in sd.items()}))
    model = load_hf(tmp_path)
    src = load_file(tmp_path / "model.safetensors")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, src["transformer.h.1.mlp.c_fc.weight"].float().t())


# ------------------------------------------------------------------------------------- ours -> HF


def test_save_hf_loads_in_transformers(tmp_path):
    model = our_model(2)
    save_hf(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert f.get_slice("transformer.wte.weight").get_shape() == [50257, 64]  # unpadded
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [64, 192]  # Conv1D (in, out)
        assert f.get_slice("transformer.h.1.mlp.c_proj.weight").get_shape() == [256, 64]
    assert "lm_head.weight" not in keys and len(keys) == 4 + 12 * 2
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["activation_function"] == "gelu_new"
    assert (cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["vocab_size"]) == (64, 64, 2, 4,
                                                                                                   50257)
    assert cfg["tie_word_embeddings"] is True and cfg["layer_norm_epsilon"] == 1e-5

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, not re-initialized
    idx = idx_batch(64)
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx), **TOL)


def test_round_trip_transformers_ours_transformers(hf_model, hf_dir, tmp_path):
    save_hf(load_hf(hf_dir), tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for k, v in hf_model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)
    idx = idx_batch(128)
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf_model, idx), rtol=0, atol=0)


def test_round_trip_ours_hf_ours(tmp_path):
    model = our_model(3)
    back = load_hf(save_hf(model, tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# ------------------------------------------------------------------------------------- HF errors


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path: Path, fn):
    sd = dict(load_file(path / "model.safetensors"))
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


ERROR_CASES = {
    "missing dir": (lambda d: d / "nope", "no such directory"),
    "missing config": (lambda d: ((d / "config.json").unlink(), d)[1], "config.json: missing"),
    "missing weights": (lambda d: ((d / "model.safetensors").unlink(), d)[1], "no model.safetensors"),
    "bad activation": (lambda d: (_edit_config(d, activation_function="relu"), d)[1], "activation_function 'relu'"),
    "not gpt2": (lambda d: (_edit_config(d, model_type="llama"), d)[1], "model_type 'llama'"),
    "config lacks field": (lambda d: (_edit_config(d, n_embd=None), d)[1], "bad field value"),
    "missing key": (lambda d: (_edit_weights(d, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias")), d)[1],
                    "missing key(s) transformer.h.1.mlp.c_fc.bias"),
    "shape mismatch": (lambda d: (_edit_config(d, n_positions=256), d)[1],
                       "transformer.wpe.weight has shape (128, 64), expected (256, 64)"),
    "conv1d not transposed": (
        lambda d: (_edit_weights(d, lambda sd: sd.update({"transformer.h.0.mlp.c_fc.weight":
                                                          sd["transformer.h.0.mlp.c_fc.weight"].t().contiguous()})),
                   d)[1], "transformer.h.0.mlp.c_fc.weight has shape (256, 64), expected (64, 256)"),
    "unexpected key": (lambda d: (_edit_weights(d, lambda sd: sd.update({"score.weight": torch.zeros(2, 64)})), d)[1],
                       "unexpected key(s) score.weight"),
    "untied head": (lambda d: (_edit_weights(d, lambda sd: sd.update({"lm_head.weight": torch.zeros(50257, 64)})),
                               d)[1], "untied LM head"),
    "corrupt bin": (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"junk"),
                               d)[2], "pytorch_model.bin: not a readable PyTorch weights file"),
    "pickled object in bin": (lambda d: ((d / "model.safetensors").unlink(),
                                         torch.save({"wte.weight": Path("x")}, d / "pytorch_model.bin"), d)[2],
                              "pytorch_model.bin: not a readable PyTorch weights file (UnpicklingError"),
    "corrupt safetensors": (lambda d: ((d / "model.safetensors").write_bytes(b"\x10garbage"), d)[1],
                            "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_load_hf_errors(hf_dir, tmp_path, case):
    make, expected = ERROR_CASES[case]
    path = make(_copy_dir(hf_dir, tmp_path / "ckpt"))
    with pytest.raises(HFFormatError) as exc:
        load_hf(path)
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert "\n" not in msg and expected in msg and str(tmp_path) in msg, msg


# --------------------------------------------------------------------------------------- llm.c
# An independent writer of the llm.c model file, straight from the layout documented in tritonrun/gpt2/llmc.py
# (llm.c's train_gpt2.py write_model/write_tensors): header, then each kind of tensor across all layers.

LLMC_ORDER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias"]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round to nearest even (finite inputs)."""
    u = x.astype("<f4").view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def write_llmc_by_hand(path, weights: dict, L, C, T, V, Vp, n_head, dtype, magic=20240326, version=None):
    header = np.zeros(256, dtype="<i4")
    header[:8] = [magic, version or {"fp32": 3, "bf16": 5}[dtype], T, V, L, n_head, C, Vp]
    tensors = [weights["transformer.wte.weight"], weights["transformer.wpe.weight"]]
    for kind in LLMC_ORDER:
        tensors += [weights[f"transformer.h.{i}.{kind}"] for i in range(L)]
    tensors += [weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"]]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for t in tensors:
            a = np.ascontiguousarray(t, dtype=np.float32)
            f.write(a.astype("<f4").tobytes() if dtype == "fp32" else bf16_bits(a).tobytes())
    return path


def source_weights(seed=5, L=2, C=64, T=32, V=50257, Vp=50304):
    """Random weights as numpy arrays under our names, nn.Linear (out, in) layout, padded rows non-zero."""
    rng = np.random.default_rng(seed)
    w = {"transformer.wte.weight": rng.normal(0, 0.5, (Vp, C)), "transformer.wpe.weight": rng.normal(0, 0.5, (T, C)),
         "transformer.ln_f.weight": rng.normal(1, 0.2, C), "transformer.ln_f.bias": rng.normal(0, 0.2, C)}
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
              "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
              "mlp.c_proj.bias": (C,)}
    for i in range(L):
        for kind, shape in shapes.items():
            w[f"transformer.h.{i}.{kind}"] = rng.normal(0, 0.5, shape)
    return {k: v.astype(np.float32) for k, v in w.items()}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_load_llmc_reads_hand_written_file(tmp_path, dtype):
    w = source_weights()
    path = write_llmc_by_hand(tmp_path / "m.bin", w, L=2, C=64, T=32, V=50257, Vp=50304, n_head=4, dtype=dtype)
    assert path.stat().st_size == 1024 + sum(a.size for a in w.values()) * (4 if dtype == "fp32" else 2)
    model = load_llmc(path)
    c = model.config
    assert (c.block_size, c.vocab_size, c.padded_vocab_size, c.n_layer, c.n_head, c.n_embd) == (32, 50257, 50304, 2,
                                                                                              4, 64)
    sd = model.state_dict()
    assert set(sd) == set(w)
    for k, a in w.items():
        expected = torch.from_numpy(a)
        if dtype == "bf16":  # equals the bf16-rounded source, torch's rounding and ours agreeing
            expected = expected.to(torch.bfloat16).float()
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], expected), k
    idx = torch.randint(0, 50257, (2, 32))
    assert our_logits(model, idx).isfinite().all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_save_llmc_bytes_equal_hand_writer(tmp_path, dtype):
    config = GPTConfig(block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = our_model(4, config)
    w = {k: v.numpy() for k, v in model.state_dict().items()}
    ref = write_llmc_by_hand(tmp_path / "ref.bin", w, L=2, C=64, T=32, V=50257, Vp=50304, n_head=4, dtype=dtype)
    ours = save_llmc(model, tmp_path / "ours.bin", dtype=dtype)
    assert ours.read_bytes() == ref.read_bytes()
    back = load_llmc(ours)
    idx = torch.randint(0, 50257, (2, 32))
    if dtype == "fp32":
        torch.testing.assert_close(our_logits(back, idx), our_logits(model, idx), rtol=0, atol=0)


def _llmc_file(tmp_path, **kw):
    w = source_weights(L=1, C=32, T=8, V=50, Vp=64)
    args = dict(L=1, C=32, T=8, V=50, Vp=64, n_head=2, dtype="fp32")
    return write_llmc_by_hand(tmp_path / "m.bin", w, **{**args, **kw})


LLMC_ERRORS = {
    "missing": (lambda p: p.with_name("absent.bin"), "no such llm.c model file"),
    "bad magic": (lambda p: _llmc_file(p.parent, magic=20240520), "bad magic 20240520 (a token shard"),
    "llama3": (lambda p: _llmc_file(p.parent, magic=20240803), "Llama 3"),
    "old version": (lambda p: _llmc_file(p.parent, version=2), "version 2 not supported"),
    "truncated": (lambda p: (p.write_bytes(p.read_bytes()[:-4]), p)[1], "truncated"),
    "trailing": (lambda p: (p.write_bytes(p.read_bytes() + b"\0\0"), p)[1], "trailing bytes"),
    "short header": (lambda p: (p.write_bytes(p.read_bytes()[:100]), p)[1], "shorter than the 1024-byte"),
    "bad n_head": (lambda p: _llmc_file(p.parent, n_head=3), "not divisible"),
    "zero layers": (lambda p: _llmc_file(p.parent, L=0), "n_layer=0"),
}


@pytest.mark.parametrize("case", list(LLMC_ERRORS))
def test_load_llmc_errors(tmp_path, case):
    make, expected = LLMC_ERRORS[case]
    path = make(_llmc_file(tmp_path))
    with pytest.raises(LlmcFormatError) as exc:
        load_llmc(path)
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError) and "\n" not in msg and expected in msg and str(path) in msg, msg


# ------------------------------------------------------------------------------------- init_from, export CLI


def _run_dir(tmp_path, model, steps=(5, 10)):
    run = tmp_path / "run"
    run.mkdir()
    for step in steps:  # the newest must win: step 5 holds other weights
        m = model if step == max(steps) else our_model(99, model.config)
        save_checkpoint(run, step, {"model_config": m.config.to_dict(), "model": m.state_dict()})
    return run


def test_init_from_each_scheme(hf_model, hf_dir, tmp_path):
    idx = idx_batch(64)
    torch.testing.assert_close(our_logits(init_from(f"hf:{hf_dir}"), idx), hf_logits(hf_model, idx), **TOL)
    model = our_model(6)
    save_llmc(model, tmp_path / "m.bin")
    assert torch.equal(our_logits(init_from(f"llmc:{tmp_path / 'm.bin'}"), idx), our_logits(model, idx))
    run = _run_dir(tmp_path, model)
    assert torch.equal(our_logits(init_from(f"ckpt:{run}"), idx), our_logits(model, idx))
    assert torch.equal(our_logits(init_from(f"ckpt:{run / 'ckpt_00000010.pt'}"), idx), our_logits(model, idx))


@pytest.mark.parametrize("spec", ["gpt2", "foo:bar", "hf:", "https://x/y"])
def test_init_from_unknown_scheme(spec):
    with pytest.raises(ValueError, match="expected hf:DIR, llmc:FILE.bin or ckpt:RUN_DIR_OR_FILE"):
        init_from(spec)


def test_init_from_empty_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        init_from(f"ckpt:{tmp_path}")


def export(*args):
    return subprocess.run([sys.executable, "-m", "tritonrun.gpt2.hf", "export", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)


def test_export_cli_round_trip(tmp_path):
    model = our_model(7)
    run = _run_dir(tmp_path, model)
    out = tmp_path / "hf-out"
    r = export("--checkpoint", run, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "ckpt_00000010.pt" in r.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = idx_batch(64)
    torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx), **TOL)


    # a user error end to end: one `error:` line, exit 2, no traceback
    r = export("--checkpoint", tmp_path / "nope", "--out", tmp_path / "fresh")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no such checkpoint" in r.stderr


def test_export_cli_user_errors(tmp_path, capsys):
    run = _run_dir(tmp_path, our_model(8))
    out = save_hf(our_model(8), tmp_path / "hf-out")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(("--checkpoint", empty, "--out", out, "--force"), "no checkpoints"),
             (("--checkpoint", out / "config.json", "--out", out, "--force"), "not a readable checkpoint"),
             (("--checkpoint", run, "--out", out / "config.json"), "not a directory"),
             (("--checkpoint", run, "--out", out), "already holds an export (config.json, model.safetensors)"),
             (("--out", out), "required: --checkpoint"),
             ((), "required: command")]
    for args, expected in cases:
        try:
            code = hf_cli(["export", *map(str, args)] if args else [])
        except SystemExit as e:  # argparse errors
            code = e.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, err)
    before = (out / "model.safetensors").stat().st_mtime_ns, (out / "model.safetensors").stat().st_ino
    assert hf_cli(["export", "--checkpoint", str(run), "--out", str(out)]) == 2  # nothing overwritten without --force
    assert ((out / "model.safetensors").stat().st_mtime_ns, (out / "model.safetensors").stat().st_ino) == before
    assert hf_cli(["export", "--checkpoint", str(run), "--out", str(out), "--force"]) == 0


# ------------------------------------------------------------------------------ speedrun checkpoints


@pytest.mark.parametrize("dense", [False, True], ids=["speedrun", "speedrun-dense"])
def test_export_refuses_a_speedrun_checkpoint(tmp_path, dense):
    """A --recipe speedrun or speedrun-dense checkpoint has no GPT2LMHeadModel form: one error line saying what it
    is and what export covers, exit 2, nothing written."""
    (tmp_path / "run").mkdir()
    save_speedrun_checkpoint(tmp_path / "run", 4, tiny_speedrun(block_size=16, dense=dense))
    out = tmp_path / "hf-out"
    r = export("--checkpoint", tmp_path / "run", "--out", out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "ckpt_00000004.pt: a speedrun model (SpeedrunGPT" in lines[0]
    assert "not a GPT2LMHeadModel" in lines[0] and "gpt2 recipe only" in lines[0]
    assert not out.exists()
    with pytest.raises(HFFormatError, match="not a GPT2LMHeadModel"):  # the library call too
        save_hf(tiny_speedrun(block_size=16, dense=dense), out)
    assert not out.exists()


def test_init_from_ckpt_gives_the_checkpoints_model_class(tmp_path):
    """ckpt: rebuilds what the checkpoint holds (a SpeedrunGPT here; GPT checkpoints: test_init_from_each_scheme)."""
    model = tiny_speedrun(3, block_size=16)
    save_speedrun_checkpoint(tmp_path, 2, model)
    loaded = init_from(f"ckpt:{tmp_path}")
    assert type(loaded) is SpeedrunGPT and loaded.config == model.config
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), model(idx))


def test_init_config_reads_a_speedrun_checkpoints_own_config(tmp_path):
    """--init-from ckpt: sizes the model from the checkpoint without loading weights (init_config ->
    read_model_config): a speedrun checkpoint gives back its SpeedrunConfig, not a GPTConfig built from the wrong
    fields (which read as an unreadable checkpoint)."""
    from tritonrun.gpt2.hf import init_config
    from tritonrun.gpt2.speedrun import SpeedrunConfig

    model = tiny_speedrun(block_size=16)
    (tmp_path / "run").mkdir()
    save_speedrun_checkpoint(tmp_path / "run", 4, model)
    cfg = init_config(f"ckpt:{tmp_path / 'run'}")
    assert isinstance(cfg, SpeedrunConfig) and cfg == model.config
