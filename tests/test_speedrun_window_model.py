"""The 2024-12-17 speedrun model (tritonrun/gpt2/speedrun.py, --recipe speedrun): the record's parameter count,
value-embedding pattern, dropped attention layer, rotary tables, window schedule and hyperparameters against the numbers
and formulas of its log; an independent fp64 re-implementation of its forward pass (document-masked sliding window,
value embeddings); --backend triton (tritonrun/kernels/window_attention.py) against --backend torch (logits, loss, every
grad including the value embeddings', and a 20-step curve) on 3 packed documents with a window shorter than T; FLOPs per
token; torch.compile against eager as the window changes (one recompile); checkpoints of both speedrun kinds, and a
2024-11-10 checkpoint written before this recipe.

Small configs keep the interpreter cheap: vocab 101 (lm_head padded to 128), d 128, 2 heads of 64 (the window
kernel's smallest head dim), 4 blocks (one value table in the first and the last, block 2 without attention), T 45
cut into documents of 17, 1 and 27 tokens, window 7."""
import contextlib
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tritonrun.gpt2.checkpoint import (build_model_from_config, checkpoint_model_kind, load_model, model_kind_of,
                                       save_checkpoint)
from tritonrun.gpt2.ops import get_ops
from tritonrun.gpt2.speedrun import (DENSE_1110, SPEEDRUN_DENSE_MODELS, SPEEDRUN_MODELS, SpeedrunConfig, SpeedrunGPT,
                           rope_tables, speedrun_lr_multiplier, speedrun_muon_momentum, speedrun_window)
from tests.helpers import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
SMALL = dataclasses.replace(SPEEDRUN_MODELS["tiny"], block_size=64, vocab_size=101, padded_vocab_size=128,
                            logit_softcap=5.0)
CU = [0, 17, 18, 45]  # three documents, one of a single token
WINDOW = 7


def randomized(model: SpeedrunGPT, seed: int = 0) -> SpeedrunGPT:
    """Non-zero values where the record zero-inits (c_proj, lm_head) and non-trivial scalars, so every term of the
    forward pass reaches the output; tables N(0, 1) as the record's init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                table = name == "transformer.wte.weight" or name.startswith("value_embeds.")
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if table else 2.0 / math.sqrt(p.shape[1])))
            else:  # block lambdas, attn lambdas, skip_weights
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.25)
        model.lm_head.weight[model.config.vocab_size:].zero_()
    return model


def small_model(backend: str = "torch", config: SpeedrunConfig = SMALL, device: str = "cpu") -> SpeedrunGPT:
    torch.manual_seed(0)
    return randomized(SpeedrunGPT(config, get_ops(backend, device))).to(device)


def reference(params: dict, c: SpeedrunConfig, idx: torch.Tensor, targets: torch.Tensor, cu: list[int], window: int):
    """The record's forward pass written out from its description in fp64 (state-dict tensors, no modules, no seam,
    no kernel file): (logits over the real vocab, mean loss). RoPE tables rounded to fp32 (the model's precision)."""
    B, T = idx.shape
    L, H, C, V, eps, k = c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.norm_eps, c.value_embeds
    D = C // H

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    freq = torch.cat([(1 / c.rope_base) ** torch.linspace(0, 1, D // 4, dtype=torch.float64),
                      torch.zeros(D // 4, dtype=torch.float64)])
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
    cos, sin = (f(angle).float().double().to(idx.device)[None, :, None, :] for f in (torch.cos, torch.sin))

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    doc = torch.zeros(T, dtype=torch.long)
    for b in cu[1:-1]:
        doc[b:] += 1
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = ((doc[:, None] == doc[None, :]) & (i - j >= 0) & (i - j < window)).to(idx.device)
    x = rms(params["transformer.wte.weight"][idx])
    x0, encoder_outputs = x, []
    ve = [params[f"value_embeds.{t}.weight"][idx].view(B, T, H, D) for t in range(k)]
    for layer in range(L):
        p = lambda name: params[f"transformer.h.{layer}.{name}"]  # noqa: B023, E731
        if layer >= L // 2:
            x = x + params["skip_weights"][layer - L // 2] * encoder_outputs[L - 1 - layer]
        x = p("lambdas")[0] * x + p("lambdas")[1] * x0
        if layer not in c.no_attention_layers:
            h = rms(x)
            q, kk, v = ((h @ p(f"attn.{n}.weight").T).view(B, T, H, D) for n in ("c_q", "c_k", "c_v"))
            table = layer if layer < k else layer - (L - k) if layer >= L - k else None
            v = p("attn.lambdas")[0] * v + (0 if table is None else p("attn.lambdas")[1] * ve[table])
            q, kk = rope(rms(q)), rope(rms(kk))
            scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(D)
            att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            x = x + torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, C) @ p("attn.c_proj.weight").T
        x = x + F.relu(rms(x) @ p("mlp.c_fc.weight").T).pow(2) @ p("mlp.c_proj.weight").T
        if layer < L // 2:
            encoder_outputs.append(x)
    logits = rms(x) @ params["lm_head.weight"][:V].T
    logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
    return logits, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


def batch(config: SpeedrunConfig = SMALL, T: int = CU[-1], device: str = "cpu", seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, config.vocab_size, (1, T + 1), generator=gen).to(device)
    return data[:, :-1], data[:, 1:], torch.tensor(CU, dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------ the record's model


@pytest.fixture(scope="module")
def d12():
    return SpeedrunGPT(SPEEDRUN_MODELS["d12"])


def test_parameter_count_equals_the_record(d12):
    """From the record's published shapes: embed and 3 value tables nn.Embedding(50257, 768); lm_head 50304 x 768;
    11 attentions (block 7 has none) of c_q, c_k, c_v, c_proj 768 x 768 + lambdas (2); 12 MLPs c_fc 3072 x 768,
    c_proj 768 x 3072; 12 block lambdas (2); skip_weights (6)."""
    C = 768
    expected = 4 * 50257 * C + 50304 * C + 11 * (4 * C * C + 2) + 12 * 2 * 4 * C * C + 12 * 2 + 6
    assert expected == 275_598_388
    assert d12.num_parameters() == expected
    assert d12.num_parameters(include_padding=False) == expected - (50304 - 50257) * C  # only lm_head is padded
    assert len(list(d12.parameters())) == 4 + 1 + 1 + 11 * 5 + 12 * 3  # the record's 97 tensors


def test_value_embeddings_and_the_dropped_attention_layer(d12):
    c = d12.config
    assert c.value_embed_layers == (0, 1, 2, None, None, None, None, None, None, 0, 1, 2)
    assert [b.attn is None for b in d12.transformer.h] == [i == 7 for i in range(12)]
    assert [tuple(t.weight.shape) for t in d12.value_embeds] == [(50257, 768)] * 3
    assert tuple(d12.transformer.wte.weight.shape) == (50257, 768) and tuple(d12.lm_head.weight.shape) == (50304, 768)
    assert all(torch.equal(b.attn.lambdas, torch.tensor([0.5, 0.5])) for b in d12.transformer.h if b.attn is not None)
    for t in [d12.transformer.wte, *d12.value_embeds]:  # nn.Embedding's N(0, 1); 38.6M samples: SE <= 1.6e-4
        assert abs(t.weight.std().item() - 1.0) < 0.01 and abs(t.weight.mean().item()) < 0.01
    assert not d12.lm_head.weight.any()


def test_window_schedule_is_the_records():
    """The record's loop: sw_num_blocks = int(((1 - frac_done) * 64 + frac_done * 1792 + 64) // 128), frac_done =
    step / 1490, in blocks of 128 tokens: 1 block at step 0, 7 at the middle, 14 (1,792 tokens) at the end."""
    c = SpeedrunConfig()
    for step in range(1491):
        f = step / 1490
        assert speedrun_window(step, c) == 128 * int(((1 - f) * 64 + f * 1792 + 64) // 128), step
    assert [speedrun_window(s, c) for s in (0, 745, 1489, 1490)] == [128, 896, 1792, 1792]
    assert len({speedrun_window(s, c) for s in range(1491)}) == 14 and c.final_window == 1792
    short = dataclasses.replace(c, num_iterations=20, warmdown_iters=8)  # a shorter run: the same curve over it
    assert speedrun_window(10, short) == 128 * int((32 + 896 + 64) // 128)


def test_hyperparameters_are_the_records():
    c = SpeedrunConfig()
    assert c.total_batch_tokens == 8 * 64 * 1024 == c.record_gpus * c.device_batch_size * c.block_size
    assert (c.num_iterations, c.warmup_iters, c.warmdown_iters, c.val_every, c.val_tokens) == (1490, 0, 600, 125,
                                                                                               10485760)
    assert (c.wte_lr, c.lm_head_lr, c.scalar_lr, c.muon_lr) == (0.6, 0.008, 0.04, 0.05)
    assert c.adam_betas == (0.8, 0.95) and c.weight_decay == 0 and c.grad_clip == 0
    assert (c.muon_momentum_warmup_start, c.muon_momentum, c.muon_momentum_warmup_steps) == (0.85, 0.95, 300)
    assert c.muon_momentum_form == "ema" and c.logit_softcap == 30 and c.rope_base == 1024
    assert [speedrun_muon_momentum(s, c) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert [speedrun_lr_multiplier(s, c) for s in (0, 889, 890, 1489)] == pytest.approx([1, 1, 1, 1 / 600])


def test_rope_tables_rotate_a_quarter_of_the_frequencies():
    """The record's Rotary: D/4 frequencies (1/1024)^linspace(0, 1, D/4), then D/4 zeros (cos 1, sin 0)."""
    cos, sin = rope_tables(50, 128, 1024.0, "half")
    t = torch.arange(50, dtype=torch.float64)[:, None]
    freq = (1 / 1024) ** torch.linspace(0, 1, 32, dtype=torch.float64)
    # fp64 values in [-1, 1] rounded once to fp32: <= 2^-25 ~ 3e-8 absolute (measured 3.0e-8), so atol 1e-7, rtol 0
    assert torch.allclose(cos[:, :32].double(), (t * freq).cos(), rtol=0, atol=1e-7)
    assert torch.allclose(sin[:, :32].double(), (t * freq).sin(), rtol=0, atol=1e-7)
    assert torch.equal(cos[:, 32:], torch.ones(50, 32)) and torch.equal(sin[:, 32:], torch.zeros(50, 32))


def test_flops_per_token_by_formula(d12):
    """6 x matmul parameters (11 attentions' 4 matrices, 12 MLPs' 2, the head's 50257 real rows; no lookup table) +
    12 * H * D per attended pair per token, 11 layers: with one 64K document and window W, the pairs per token are
    (W (W + 1) / 2 + (T - W) W) / T."""
    C, T = 768, 65536
    matmul = 11 * 4 * C * C + 12 * 8 * C * C + 50257 * C
    for w in (128, 1792):
        pairs = w * (w + 1) // 2 + (T - w) * w
        assert d12.flops_per_token(T, w) == 6 * matmul + round(12 * 11 * C * pairs / T)
    assert d12.flops_per_token(T) == d12.flops_per_token(T, 1792)
    dense_attention = 6 * 11 * C * T  # the same model with dense causal attention at T = 64K
    assert (d12.flops_per_token(T) - 6 * matmul) * 10 < dense_attention  # issue 27's goal: >= 10x fewer


def test_optimizer_groups_put_the_value_embeddings_with_wte(d12):
    groups = d12.optimizer_groups()
    adam = {g["name"]: g for g in groups["adam"]}
    assert adam["wte"]["lr"] == 0.6 and len(adam["wte"]["params"]) == 4
    assert all(any(p is t.weight for p in adam["wte"]["params"]) for t in d12.value_embeds)
    everything = [p for g in groups["adam"] + groups["muon"] for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == len(list(d12.parameters()))
    assert groups["muon"][0]["lr"] == 0.05 and all(p.dim() == 2 for p in groups["muon"][0]["params"])
    assert len(groups["muon"][0]["params"]) == 11 * 4 + 12 * 2


# ----------------------------------------------------------------------------------------- the math


def test_forward_and_grads_match_the_fp64_reference():
    model = small_model().double()
    idx, targets, cu = batch()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref_logits, ref_loss = reference(params, SMALL, idx, targets, CU, WINDOW)
    ref_loss.backward()
    loss = model(idx, targets, cu, WINDOW)
    loss.backward()
    with torch.no_grad():
        logits = model(idx, None, cu, WINDOW)
    # fp64 both sides, only the order of operations differs: measured <= 1e-14 on logits, loss and every grad
    assert torch.allclose(logits, ref_logits, rtol=1e-10, atol=1e-10)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert torch.allclose(p.grad, params[name].grad, rtol=1e-8, atol=1e-10), name
    # the window and the documents matter: a wider window or one document gives another loss
    assert abs(model(idx, targets, cu, 45).item() - loss.item()) > 1e-3  # measured 0.11
    assert abs(model(idx, targets, None, WINDOW).item() - loss.item()) > 1e-3  # measured 0.054


def test_defaults_are_one_document_and_the_final_window():
    """sample.py and HellaSwag feed plain (B, T) batches: one document per row, the schedule's last window."""
    model = small_model().eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 40))
    cu = torch.tensor([0, 40], dtype=torch.int32)
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx, None, cu, SMALL.final_window))


def autocast(device: str, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def check_backends(config: SpeedrunConfig, T: int, device: str, dtype: torch.dtype | None, floor: float) -> None:
    """Logits, loss and every grad of the triton model against the fp64 torch model within twice the torch model's
    own error plus floor x the largest magnitude (REFERENCE.md). The scalars' grads are one group (each is a single
    sum over T * C terms whose torch error is a lucky draw: tests/test_speedrun_model.py)."""
    models = {"ref": small_model("torch", config, device).double(), "torch": small_model("torch", config, device),
              "triton": small_model("triton", config, device)}
    idx, targets, cu = batch(config, T, device)
    out = {}
    for name, model in models.items():
        with autocast(device, None if name == "ref" else dtype):
            logits = model(idx, None, cu, WINDOW)
            loss = model(idx, targets, cu, WINDOW)
        loss.backward()
        grads = dict(model.named_parameters())
        scalars = torch.cat([grads.pop(n).grad.reshape(-1) for n in list(grads) if grads[n].dim() < 2])
        out[name] = {"logits": logits.detach(), "loss": loss.detach(), "scalar grads": scalars,
                     **{n: p.grad for n, p in grads.items()}}
    assert "value_embeds.0.weight" in out["ref"] and len(out["ref"]) == 3 + 2 + config.value_embeds + (
        4 * config.attention_layers + 2 * config.n_layer)
    for key, ref in out["ref"].items():
        bound = 2 * max_err(out["torch"][key], ref) + floor * ref.abs().max().item()
        assert max_err(out["triton"][key], ref) <= bound, key


def test_triton_backend_matches_torch_backend():
    """fp32 on CPU (the interpreter's bf16 tl.dot is wrong), 8-ulp fp32 floor; 3 documents, window 7 < T = 45."""
    check_backends(SMALL, CU[-1], DEVICE, dtype=None, floor=2.0**-20)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: bf16 autocast runs attention and the LM head in bf16 tl.dot, which the Triton interpreter computes wrongly")
def test_gpu_bf16_triton_backend_follows_the_low_precision_rule():
    check_backends(SMALL, CU[-1], "cuda", dtype=torch.bfloat16, floor=2.0**-7)


def curve(backend: str, steps: int = 20) -> list[float]:
    """Losses of `steps` Adam steps (lr 1e-2) on one packed batch, from `randomized` weights: every gradient far
    above fp32's resolution (tests/test_speedrun_model.py explains the record's zero init's sub-resolution ones)."""
    idx, targets, cu = batch()
    model = small_model(backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(steps):
        loss = model(idx, targets, cu, WINDOW)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(HAS_CUDA, reason="on a CUDA machine the kernels are compiled, not interpreted")
def test_20_steps_triton_backend_follows_torch_backend():
    """fp32 on CPU, Adam only: the two backends differ only in summation order (the window kernel's online softmax
    against SDPA's masked one), so the curves agree as the dense speedrun model's do (rel 1e-5,
    tests/test_speedrun_model.py; measured 1.9e-6 here)."""
    ref, ours = curve("torch"), curve("triton")
    assert ref[-1] < ref[0] - 1.0  # it learns, so the comparison means something
    assert ours == pytest.approx(ref, rel=1e-5)


def test_compile_follows_eager_as_the_window_changes():
    """torch.compile of the windowed model (torch backend: masked SDPA on CPU) with the window changing as the
    schedule changes it: loss and every grad follow eager at each window (fp32, only fusion and summation order
    differ: rel 1e-5 on the loss, 1e-4 of the largest magnitude on each grad; measured 9e-8 and 5.3e-6, the latter
    on the attention lambdas, single sums over T * C terms), and Dynamo compiles two graphs: the
    first window specialized, then (automatic dynamic) one with a symbolic window that serves every later one."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = small_model()
    compiled = torch.compile(model)
    idx, targets, cu = batch()
    params = list(model.parameters())
    for window in (7, 7, 13, 30, 45):
        want = model(idx, targets, cu, window)
        want_grads = torch.autograd.grad(want, params)
        got = compiled(idx, targets, cu, window)
        got_grads = torch.autograd.grad(got, params)
        assert got.item() == pytest.approx(want.item(), rel=1e-5), window
        for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
            assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-12, (window, name)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


# -------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_name_each_speedrun_kind(tmp_path):
    model, dense = small_model(), SpeedrunGPT(SPEEDRUN_DENSE_MODELS["tiny"])
    assert model_kind_of(model) == "speedrun" and model_kind_of(dense) == "speedrun-dense"
    for kind, m in (("speedrun", model), ("speedrun-dense", dense)):
        rebuilt = build_model_from_config(kind, json.loads(json.dumps(m.config.to_dict())))
        assert rebuilt.config == m.config
    save_checkpoint(tmp_path, 3, {"model_kind": "speedrun", "model_config": model.config.to_dict(),
                                  "model": model.state_dict()})
    loaded = load_model(tmp_path / "ckpt_00000003.pt")
    idx, _, cu = batch()
    with torch.no_grad():
        assert torch.equal(loaded(idx, None, cu, WINDOW), model.eval()(idx, None, cu, WINDOW))


def test_a_2024_11_10_checkpoint_from_before_this_recipe_loads_as_speedrun_dense(tmp_path):
    """Written before: model_kind "speedrun" and the old SpeedrunConfig's fields only (no attention, value_embeds,
    ...). It must load as the dense 11-10 model with its own values, weights and outputs."""
    old_fields = ["block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio",
                  "rope_base", "norm_eps", "logit_softcap", "value_lamb_init", "block_lambdas_init",
                  "skip_weight_init", "wte_lr", "lm_head_lr", "scalar_lr", "adam_betas", "adam_eps", "weight_decay",
                  "muon_lr", "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps",
                  "muon_nesterov", "muon_ns_steps", "muon_ns_coefficients", "muon_ns_eps", "muon_orthogonalizer",
                  "grad_clip", "total_batch_tokens", "device_batch_size", "num_iterations", "warmup_iters",
                  "warmdown_iters", "val_every", "val_tokens"]
    dense = SpeedrunGPT(SPEEDRUN_DENSE_MODELS["tiny"])
    old_config = {k: v for k, v in json.loads(json.dumps(dense.config.to_dict())).items() if k in old_fields}
    assert len(old_config) == len(old_fields)
    ckpt = {"model_kind": "speedrun", "model_config": old_config, "model": dense.state_dict()}
    assert checkpoint_model_kind(ckpt) == "speedrun-dense"
    save_checkpoint(tmp_path, 7, ckpt)
    loaded = load_model(tmp_path / "ckpt_00000007.pt")
    assert loaded.config == SPEEDRUN_DENSE_MODELS["tiny"] and loaded.config.attention == "dense"
    assert SpeedrunConfig.from_dict({k: v for k, v in SPEEDRUN_DENSE_MODELS["d12"].to_dict().items()
                                     if k in old_fields}) == SpeedrunConfig(**DENSE_1110)
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx), dense.eval()(idx))


def test_torch_attention_builds_one_mask_per_forward(monkeypatch):
    """The torch path's mask (a FlexAttention BlockMask when compiled on CUDA, the dense mask elsewhere) is built
    once per forward and shared by every attention layer (it was once per layer: 11 per micro-batch at d12), with
    the same result."""
    from tritonrun.gpt2 import speedrun as sr

    torch.manual_seed(0)
    model = SpeedrunGPT(SPEEDRUN_MODELS["tiny"], get_ops("torch"))
    idx = torch.randint(0, 50257, (1, 64))
    cu = torch.tensor([0, 9, 10, 40, 64], dtype=torch.int32)
    want = model(idx, idx, cu, 32)
    calls = []
    real = sr.torch_window_mask
    monkeypatch.setattr(sr, "torch_window_mask", lambda *a: calls.append(a) or real(*a))
    got = model(idx, idx, cu, 32)
    n_attn = sum(b.attn is not None for b in model.transformer.h)
    assert n_attn > 1 and len(calls) == 1 and torch.equal(got, want)


def test_eager_torch_window_attention_refuses_a_huge_dense_mask_on_a_gpu(tmp_path, monkeypatch, capsys):
    """On CUDA without --compile the torch path would build a dense T x T mask: above DENSE_WINDOW_MASK_MAX_T the
    op refuses with the fix named, and the trainer refuses such a run at startup in one line (here: the h100's
    packed length, sized for its memory, under --no-compile)."""
    from tritonrun import train
    from tritonrun.gpt2.ops import DENSE_WINDOW_MASK_MAX_T, torch_window_mask

    T = DENSE_WINDOW_MASK_MAX_T * 2
    with pytest.raises(ValueError, match="add --compile .* or --backend triton"):
        torch_window_mask(torch.tensor([0, T], dtype=torch.int32), 128, T, torch.device("cuda"))
    monkeypatch.chdir(tmp_path)
    assert train.main(["--gpu", "h100", "--recipe", "speedrun", "--no-compile", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dense 32768 x 32768 mask" in err[0] and "--compile" in err[0], err
    assert train.main(["--gpu", "h100", "--recipe", "speedrun", "--no-compile", "--backend", "triton",
                       "--dry-run"]) == 0  # the kernel
