"""Record #89's model (modded-nanogpt train_gpt.py at f411b3d3, GPT, H1208-1692), written from its facts; the code is
ours. "[H1494]" is that file's line. tritonrun/gpt2/speedrun89.py has its schedule, rotary tables and head loss.

Topology (d12: 11 layers, 6 heads of 128, width 768; the gate layouts are fixed for 11 layers of 6 heads):
  embeddings  x = embed(ids); smear: x[t] += lambda_s sigmoid(w_s . x[t][:12]) x[t-1] (t >= 1) [H1546-1549];
              x0 = rms_norm(x). Bigram hash embedding with the sign trick b (ops.bigram_embed) [H1535-1538].
              Value embeddings: 5 tables; layers 1, 2, 8, 9, 10 use tables 0..4 [H1541-1544].
  gates       the MUDD gate network g = (W2 gelu(W1 x) + b2) * scale: "pre" (26 lanes) from x0, "post" (41) from the
              residual at layer 4; lanes: XSA strengths, attention output gates, per-layer (x0, bigram) injection
              weights, the skip gate, DC MHA's w1 / w2 [H1436-1484].
  layer i     attention (none on layer 6: x += sigmoid(skip) g_skip cache[3] instead) on rms_norm(x), or on
              rms_norm(cache[7]) for layers 8-10 [H1598]; x = r_a x + p_a attn + g_x0 x0, + g_b b for i > 0;
              MLP: x = r_m x + p_m relu2_mlp(rms_norm(x)). Layer 10 takes its mixing weights from the MUDD network
              (14 lanes from x) and adds a dynamic dense value (mu0 cache0 + mu1 cache7 + mu2 x) to V [H1601-1663].
  attention   q, k, v = x (l0 W_qkv)^T; QK RMS norm; half-truncated RoPE + YaRN (speedrun89.rotary); partial key
              offset on the long-window layers 3, 10; v += gated value embedding; paired-head layers 0, 2, 5, 9
              interleave two heads' streams into a doubled sequence [H1118-1136]; document-masked causal sliding
              window (FA3 window_size=(w, 0): w + 1 keys) at softmax scale speedrun89.yarn_at; layer 10 adds DC
              MHA's post-softmax cross-head correction over 112 keys [DC]; XSA on 1, 3, 4, 7; output gates on 3, 10;
              out = y (l1 W_o)^T [H1093-1162].
  head        after the loop x += MUDD(5 lanes) of cache0, cache7, cache9, value table 0, cache3; rms_norm; training
              loss: ops.mtp_head (sigmoid-rescaled logits, multi-token prediction, prefix-token term) [H1677-1692];
              eval: plain cross-entropy of 23 sigmoid((l + 5) / 7.5).

FP8 (fp8=True, the Triton backend): in training forwards each MLP runs the record's FP8 step (tritonrun/kernels/
mlp_relu2.py: x and W1 in e4m3 at their amax, the down projection at the delayed activation scale and W2's delayed
scale); refresh_fp8() re-quantizes the weights at the start and after every optimizer step. Eval runs bf16, as the
record. The record's LM head also runs in FP8 (e4m3 in, e5m2 gradient); ours stays bf16 (the fused head,
tritonrun/kernels/mtp_head.py, has no FP8 path): a deviation.

Storage as the record's (bf16 except the fp32 scalars / lambdas / gate scale) with dtype="bfloat16"; dtype="float32"
keeps every parameter fp32 (CPU tests, the check against the record's own code at fp32). Banks are single-GPU:
qk_bank 60 head-pair blocks, vo_bank 20 matrices (the record pads both to a multiple of the world size); mlp_bank keeps
the record's 12th (unused) layer as a (24, 4C, C) stack of matrices (c_fc at even, c_proj at odd indices; c_proj is
stored (4C, C), used without a transpose, as the record).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonrun.gpt2 import speedrun89 as s89

PAIRED_LAYERS = (0, 2, 5, 9)  # [H1252]
NO_ATTENTION_LAYER = 6  # [H1269]
LONG_LAYERS = (3, 10)  # bm_sizes: long windows (and the partial key offset) [H1494-1496]
XSA_LAYERS = (1, 3, 4, 7)  # [H1238]
DC_LAYER = 10  # [H1239]
GATE_LAYERS = (3, 10)  # attention output gates [H1240]
CACHE_LAYERS = (3, 7)  # [H1249]
VALUE_LAYERS = {1: 0, 2: 1, 8: 2, 9: 3, 10: 4}  # layer -> value table [H1541-1544]
DC_WINDOW = 112  # DC MHA's local window in keys [H1147 window=112]
MUDD_SCALE = 0.1  # [H1368 _mudd_scale]
MUDD_DIM = 64  # [H1369, H1441]
PRE_LANES, POST_LANES = 26, 41  # the MUDD gate's lanes [H1444-1445]


@dataclass(frozen=True)
class Record89Config:
    vocab_size: int = 50257  # padded to a multiple of 128 for the tables and the head [H1216]
    n_layer: int = 11
    n_head: int = 6
    head_dim: int = 128
    n_embd: int = 768
    bigram_rows: int = 50304 * 15 // 2  # [H1902 bigram_vocab_size]
    sign_rows: int = 8192  # [H1904 bigram_sign_table_rows]
    dtype: str = "bfloat16"  # parameter storage: the record's (bfloat16) or all fp32 ("float32")
    model_kind: str = "record89"

    def __post_init__(self) -> None:
        if self.n_layer != 11 or self.n_head != 6 or self.n_head * self.head_dim != self.n_embd:
            raise ValueError(f"record #89's model has 11 layers of 6 heads with n_embd = 6 x head_dim (its gate "
                             f"layouts are fixed), got {self.n_layer} layers, {self.n_head} heads, head_dim "
                             f"{self.head_dim}, n_embd {self.n_embd}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 (half-truncated RoPE pairs), got {self.head_dim}")

    @property
    def block_size(self) -> int:
        """The longest packed sequence a run may give it (--seq-len): 2^16. Nothing in the model is sized by it (the
        rotary tables are built for the run's length); the record's sequences are 16,384-49,152 tokens per GPU in
        training, 262,144 in validation."""
        return 65536

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // 128) * 128

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Record89Config:
        return cls(**d)


RECORD89_MODELS = {
    "d12": Record89Config(),  # the record's [H2234-2241]
    # CPU runs and tests: the record's topology at width 384 (heads of 64, the Triton window attention's smallest)
    # and a 4,096-row bigram table
    "tiny": Record89Config(head_dim=64, n_embd=384, bigram_rows=4096),
}


def _norm(x: torch.Tensor) -> torch.Tensor:
    """The record's weightless RMSNorm, eps = the dtype's machine epsilon (F.rms_norm's default) [H952-953]."""
    return F.rms_norm(x, (x.size(-1),))


class _Gates:
    """Per-layer lanes of the MUDD gates (the record's unpack_pre / unpack_post_mudd_gate) [H1470-1484]."""

    def __init__(self, n_layer: int):
        self.xsa = [None] * n_layer
        self.attn = [None] * n_layer
        self.x0 = [None] * n_layer
        self.bigram = [None] * n_layer
        self.skip = self.dc = None

    def unpack_pre(self, g: torch.Tensor) -> None:
        self.xsa[1], self.xsa[3], self.attn[3] = g[..., 0:6], g[..., 6:12], g[..., 12:18]
        for layer, off in zip((0, 1, 2, 3), range(18, 26, 2)):
            self.x0[layer], self.bigram[layer] = g[..., off:off + 1], g[..., off + 1:off + 2]

    def unpack_post(self, g: torch.Tensor) -> None:
        self.xsa[4], self.xsa[7], self.attn[10] = g[..., 0:6], g[..., 6:12], g[..., 12:18]
        for layer, off in zip((4, 5, 7, 8, 9), range(18, 28, 2)):
            self.x0[layer], self.bigram[layer] = g[..., off:off + 1], g[..., off + 1:off + 2]
        self.skip = g[..., 28:29]
        self.dc = (g[..., 29:35], g[..., 35:41])


def dc_correction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  cu_seqlens: torch.Tensor, scale: float, window: int = DC_WINDOW, block: int = 128) -> torch.Tensor:
    """DC MHA's post-only correction [record #89 dc_triton_kernels.py, the Triton kernels' math]: per query t and head
    h, P_h[t, s] = softmax over the keys s of t's document with 0 <= t - s < window of scale q_h[t] . k_h[s];
    A[t, s] = sum_h w1[t, h] P_h[t, s]; returns corr_h[t] = w2[t, h] sum_s A[t, s] v_h[s]. q, k, v (T, H, D); w1
    (already RMS-normed over heads), w2 (T, H). Blocks of `block` queries each see the keys of their block and the
    one before (block >= window), so memory is O(T x 2 block), not O(T^2)."""
    T, H, D = q.shape
    if block < window:
        raise ValueError(f"dc_correction: block ({block}) must be >= window ({window})")
    nb = -(-T // block)
    pad = nb * block - T
    pos = torch.arange(T, device=q.device)
    doc = torch.searchsorted(cu_seqlens.long(), pos, right=True)

    def padded(x, front_value=0):  # block of zeros in front, tail to a whole block
        return F.pad(x, (0, 0) * (x.dim() - 1) + (block, pad), value=front_value)

    kw = padded(k).unfold(0, 2 * block, block)[:nb]  # (nb, H, D, 2 block)
    vw = padded(v).unfold(0, 2 * block, block)[:nb]
    kpos = (torch.arange(-block, T + pad, device=q.device)).unfold(0, 2 * block, block)[:nb]  # (nb, 2 block)
    kdoc = F.pad(doc, (block, pad), value=-1).unfold(0, 2 * block, block)[:nb]
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(nb, block, H, D)
    qpos = F.pad(pos, (0, pad), value=-(1 << 30)).view(nb, block)
    qdoc = F.pad(doc, (0, pad), value=-2).view(nb, block)
    rel = qpos[:, :, None] - kpos[:, None, :]  # (nb, block, 2 block)
    ok = (rel >= 0) & (rel < window) & (kpos[:, None, :] >= 0) & (qdoc[:, :, None] == kdoc[:, None, :])
    s = torch.einsum("nqhd,nhdk->nhqk", qb, kw) * scale  # (nb, H, block, 2 block)
    s = s.masked_fill(~ok[:, None], float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0)  # padded query rows have no key: 0
    w1b = F.pad(w1, (0, 0, 0, pad)).view(nb, block, H).float()
    a = torch.einsum("nqh,nhqk->nqk", w1b, p)  # (nb, block, 2 block)
    w2b = F.pad(w2, (0, 0, 0, pad)).view(nb, block, H).float()
    corr = torch.einsum("nqh,nqk,nhdk->nqhd", w2b, a, vw.float())
    return corr.reshape(nb * block, H, D)[:T].to(q.dtype)


class Record89GPT(nn.Module):
    """Record #89's GPT (module docstring). forward(ids, targets, cu_seqlens, step_cfg) -> per-token losses."""

    def __init__(self, config: Record89Config, ops=None, fp8: bool = False):
        super().__init__()
        if ops is None:
            from tritonrun.gpt2.ops import get_ops

            ops = get_ops("torch")
        if fp8 and not ops.placement.get("relu2_mlp", "torch").startswith("triton"):
            raise ValueError("FP8 MLP matmuls run in the Triton relu2_mlp kernel: use --backend triton (and no "
                             "--torch-ops relu2_mlp), or --fp8 off")
        self.config, self.ops = config, ops
        # FP8 MLP (training forwards only, as the record): one Fp8MlpScales per layer, made by refresh_fp8()
        self.fp8 = fp8
        self.fp8_scales: list | None = None
        c = config
        C, Vp, D, L = c.n_embd, c.padded_vocab, c.head_dim, c.n_layer
        dt = c.torch_dtype
        n_attn = L - 1
        self.lm_head = nn.Parameter(torch.empty(C, Vp, dtype=dt))  # logits = x @ lm_head [H970 CastedLinearT]
        self.embed = nn.Parameter(torch.empty(Vp, C, dtype=dt))  # tied to lm_head^T until the untie step
        self.value_embeds = nn.Parameter(torch.empty(5 * Vp, C, dtype=dt))  # [H1261]
        self.ve_gate_bank = nn.Parameter(torch.empty(5, c.n_head, 12, dtype=dt))  # [H1264]; table 4's is unused
        self.qk_bank = nn.Parameter(torch.empty(n_attn * 2 * (c.n_head // 2), 2 * D, C, dtype=dt))  # [H1272-1278]
        self.vo_bank = nn.Parameter(torch.empty(n_attn * 2, C, C, dtype=dt))  # [H1280-1284]
        self.mlp_bank = nn.Parameter(torch.empty(24, 4 * C, C, dtype=dt))  # [H1296-1301] (12, 2, 4C, C) flattened
        self.smear_gate = nn.Parameter(torch.empty(1, 12, dtype=dt))  # [H1326]
        self.bigram_embed = nn.Parameter(torch.empty(c.bigram_rows, C, dtype=dt))  # [H1329]
        self.register_buffer("bigram_sign_table", torch.empty(c.sign_rows, C, dtype=dt))  # [H1331]
        self.post_lambdas = nn.Parameter(torch.empty(L, 2))  # fp32 [H1334]
        self.resid_lambdas = nn.Parameter(torch.empty(L, 2))  # fp32 [H1338]
        self.scalars = nn.Parameter(torch.empty(2 * L + 2))  # sa lambdas, smear, skip; fp32 [H1340-1350]
        self.mudd_w1 = nn.Parameter(torch.empty(2, MUDD_DIM, C, dtype=dt))  # [H1370-1374]
        self.mudd_w2 = nn.Parameter(torch.empty(2, 14, MUDD_DIM, dtype=dt))
        self.mudd_b2 = nn.Parameter(torch.empty(2, 14, dtype=dt))
        self.mudd_gate_scale = nn.Parameter(torch.empty(()))  # fp32 [H1437 _mudd_gate_scale]
        self.mudd_gate_w1 = nn.Parameter(torch.empty(2, MUDD_DIM, C, dtype=dt))  # [H1447-1451]
        self.mudd_gate_w2 = nn.Parameter(torch.empty(2, POST_LANES, MUDD_DIM, dtype=dt))
        self.mudd_gate_b2 = nn.Parameter(torch.empty(2, POST_LANES, dtype=dt))
        # each token's prefix token (speedrun89 / data.tokenizer.prefix_table); -1 (no prefix term) until set
        self.register_buffer("prefix_table", torch.full((Vp,), -1, dtype=torch.long), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The record's init [H1216-1460], in its storage dtypes."""
        c = self.config
        C = c.n_embd
        self.lm_head.normal_(0, 0.005)
        self.embed.copy_(self.lm_head.t())
        self.value_embeds.normal_().mul_(0.01)
        self.ve_gate_bank.zero_()
        bound = 3 ** 0.5 * 0.5 * C ** -0.5  # [H1286-1287]
        self.qk_bank.uniform_(-bound, bound)
        self.vo_bank.uniform_(-bound, bound)
        self.mlp_bank[0::2].uniform_(-bound, bound)  # c_fc; c_proj zero [H1304-1308]
        self.mlp_bank[1::2].zero_()
        self.smear_gate.zero_()
        self.bigram_embed.zero_()
        self.bigram_sign_table.copy_(torch.randn(self.bigram_sign_table.shape).sign())
        self.post_lambdas.fill_(1.0)
        self.resid_lambdas.fill_(1.1 ** 0.5)
        L = c.n_layer
        self.scalars.copy_(torch.tensor([0.5, 1.0] * L + [0.0, -1.5]))
        for w in (self.mudd_w1, self.mudd_gate_w1):
            for j in range(2):
                w32 = torch.empty(w.shape[1:])
                nn.init.kaiming_uniform_(w32, a=math.sqrt(5))
                w[j].copy_(w32)
        self.mudd_w2.zero_()
        self.mudd_gate_w2.zero_()
        b = torch.zeros(2, 14)  # [H1384-1394], stored in the pre-scaled domain
        b[0, 6] = b[0, 7] = 2.0 / MUDD_SCALE
        b[0, 8] = b[0, 12] = 1.1 ** 0.5 / MUDD_SCALE
        b[0, 9] = b[0, 13] = 1.0 / MUDD_SCALE
        b[0, 11] = 0.05 / MUDD_SCALE
        b[1, 1] = -0.5 / MUDD_SCALE
        self.mudd_b2.copy_(b)
        self.mudd_gate_scale.fill_(0.1)
        g = torch.zeros(2, POST_LANES)  # [H1453-1462]
        g[0, 12:18] = g[1, 12:18] = 0.25 / 0.1
        g[0, 19:26:2] = 0.05 / 0.1
        g[1, 19:28:2] = 0.05 / 0.1
        g[1, 28] = 0.5 / 0.1
        g[1, 29:35] = 1.0 / 0.1
        self.mudd_gate_b2.copy_(g)

    @torch.no_grad()
    def refresh_fp8(self) -> None:
        """Re-quantize every layer's MLP weights for FP8 (tritonrun/kernels/mlp_relu2.Fp8MlpScales.refresh): at the
        start and after every optimizer step, as the record's quantize_mlp_fp8 [H2300, H2365]. No-op without fp8."""
        if not self.fp8:
            return
        from tritonrun.kernels.mlp_relu2 import Fp8MlpScales

        if self.fp8_scales is None:
            self.fp8_scales = [Fp8MlpScales(self.mlp_bank.device) for _ in range(self.config.n_layer)]
        for i, scales in enumerate(self.fp8_scales):
            scales.refresh(self.mlp_bank[2 * i], self.mlp_bank[2 * i + 1].t())

    def fp8_state_dict(self) -> list[dict] | None:
        """Every layer's FP8 scales (Fp8MlpScales.state_dict), None before the first refresh or without fp8: a
        checkpoint carries them so that a resumed run quantizes as the straight one."""
        return None if self.fp8_scales is None else [s.state_dict() for s in self.fp8_scales]

    def load_fp8_state_dict(self, state: list[dict] | None) -> None:
        """Restore fp8_state_dict() over the current weights (None: nothing to restore)."""
        if not self.fp8 or state is None:
            return
        from tritonrun.kernels.mlp_relu2 import Fp8MlpScales

        self.fp8_scales = [Fp8MlpScales(self.mlp_bank.device) for _ in range(self.config.n_layer)]
        for i, (scales, s) in enumerate(zip(self.fp8_scales, state)):
            scales.load_state_dict(s, self.mlp_bank[2 * i], self.mlp_bank[2 * i + 1].t())

    # ------------------------------------------------------------------------------------------- sizes
    def padding_parameters(self) -> int:
        """Parameters in padded vocabulary rows: lm_head's columns, embed's and the five value tables' rows."""
        c = self.config
        return 7 * (c.padded_vocab - c.vocab_size) * c.n_embd

    def num_parameters(self, include_padding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_padding else n - self.padding_parameters()

    def flops_per_token(self, seq_len: int, windows: tuple[int, int], fp8_ratio: float = 1.0) -> int:
        """Training FLOPs per token for MFU, in bf16-peak units: 6 M + attention, as SpeedrunGPT.flops_per_token
        counts them. M = the matrices every token multiplies through: the 10 attention layers' Q, K, V, O (4 C^2),
        the 11 MLPs' (8 C^2), the MUDD and gate networks (4 x (64 C + 64 lanes)), the LM head over its vocab_size
        real columns; the lookups (embed, value tables, bigram table) and elementwise work are not counted.
        Attention: 12 H D per (query, key) pair, the pairs a T-token document allows at the layer's window (short on
        8 layers, long on layers 3 and 10; a paired-head layer attends a doubled sequence of half the heads: the
        same count); DC MHA's 112-key correction on layer 10 is left out (< 1 % of the step).
        fp8_ratio (the FP8 peak over the bf16 peak, 2 on sm_89 / sm_90) with FP8 MLPs: the MLPs' two forward
        matmuls run at the FP8 rate, so they count 1 / fp8_ratio of their FLOPs (the MFU then weighs each matmul
        at its own precision's peak: presets.mixed_mfu)."""
        c = self.config
        C, L = c.n_embd, c.n_layer
        mlp = L * 8 * C * C
        matmul = (L - 1) * 4 * C * C + mlp + 4 * MUDD_DIM * C + MUDD_DIM * (14 + 5 + PRE_LANES + POST_LANES) \
            + c.vocab_size * C
        flops = 6 * matmul
        if self.fp8 and fp8_ratio != 1.0:
            flops -= round(2 * mlp * (1 - 1 / fp8_ratio))
        attn = 0
        for i in range(L):
            if i == NO_ATTENTION_LAYER:
                continue
            w = min(windows[1] if i in LONG_LAYERS else windows[0], seq_len) + 1  # FA3 (w, 0): w + 1 keys
            w = min(w, seq_len)
            pairs = w * (w + 1) // 2 + (seq_len - w) * w
            attn += 12 * C * pairs / seq_len
        return flops + round(attn)

    # ------------------------------------------------------------------------------------------- forward
    def _mudd(self, x, j: int, n: int):
        h = F.gelu(F.linear(x, self.mudd_w1[j]))
        return ((F.linear(h, self.mudd_w2[j, :n]) + self.mudd_b2[j, :n]) * MUDD_SCALE).split(1, dim=-1)

    def _mudd_gate(self, x, j: int, n: int):
        h = F.gelu(F.linear(x, self.mudd_gate_w1[j]))
        return (F.linear(h, self.mudd_gate_w2[j, :n]) + self.mudd_gate_b2[j, :n]) * self.mudd_gate_scale.type_as(x)

    def _attend(self, q, k, v, cu_seqlens, window: int, scale: float):
        """(T, H, D) -> (T, H, D): document-masked causal attention over window keys (FA3's (w, 0) = w + 1)."""
        o = self.ops.window_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                                      cu_seqlens, window + 1, scale=scale)
        return o.transpose(1, 2)[0]

    def _attention(self, i: int, x, w, sa, window: int, rope, scale: float, cu_seqlens, aux_v, gates: _Gates):
        c = self.config
        T, H, D, C = x.shape[0], c.n_head, c.head_dim, c.n_embd
        q, k, v = F.linear(x, sa[0] * w[:3 * C].type_as(x)).view(T, 3 * H, D).chunk(3, dim=-2)
        q, k = _norm(q), _norm(k)
        if i in PAIRED_LAYERS:
            cos, sin = rope["paired"]
            q = s89.rotary(q.reshape(1, T, H // 2, 2 * D), cos, sin).view(2 * T, H // 2, D)
            k = s89.rotary(k.reshape(1, T, H // 2, 2 * D), cos, sin).view(2 * T, H // 2, D)
            v = v.reshape(2 * T, H // 2, D)
            if aux_v is not None:
                v = v + aux_v.view_as(v)
            y = self._attend(q, k, v, 2 * cu_seqlens, window, scale).reshape(T, H, D)
        else:
            cos, sin = rope["plain"]
            q, k = s89.rotary(q[None], cos, sin)[0], s89.rotary(k[None], cos, sin)[0]
            if i in LONG_LAYERS:  # partial key offset: the stationary half of each key comes from t - 1 [H1111-1113]
                k = torch.cat((k[:, :, :D // 2], torch.cat((k[:1, :, D // 2:], k[:-1, :, D // 2:]))), dim=-1)
            if aux_v is not None:
                v = v + aux_v.view_as(v)
            y = self._attend(q, k, v, cu_seqlens, window, scale)
            if i == DC_LAYER:
                w1 = F.rms_norm(gates.dc[0].float(), (H,), eps=1e-6).type_as(x)  # [H1072-1080 dc_gate]
                y = y + dc_correction(q, k, v, w1, gates.dc[1].type_as(x), cu_seqlens, scale).to(y.dtype)
            if gates.xsa[i] is not None:  # [H1153-1157]
                dot = (y * v).sum(-1, keepdim=True)
                denom = v.square().sum(-1, keepdim=True).clamp_min(1e-8)
                y = y - torch.tanh(gates.xsa[i]).type_as(y).view(T, H, 1) * (dot / denom) * v
        if i in GATE_LAYERS:
            y = y * gates.attn[i].type_as(y).view(T, H, 1)
        return F.linear(y.reshape(T, C), sa[1] * w[3 * C:].type_as(y))

    def hidden(self, ids: torch.Tensor, cu_seqlens: torch.Tensor, windows: tuple[int, int], rope: dict,
               scale: float) -> torch.Tensor:
        """The final normed hidden states (T, C) of one packed sequence ids (T,) with document starts cu_seqlens
        (int32, padded with T allowed); windows = (short, long) in tokens; rope = {"plain": (cos, sin), "paired":
        (cos, sin)} tables (speedrun89.rotary_tables) of >= T (2T paired) positions; scale the softmax scale."""
        c, ops = self.config, self.ops
        if self.fp8 and self.training and self.fp8_scales is None:
            raise RuntimeError("Record89GPT(fp8=True): call refresh_fp8() after building (and after each optimizer "
                               "step) before training forwards")
        L, H, D, C, Vp = c.n_layer, c.n_head, c.head_dim, c.n_embd, c.padded_vocab
        T = ids.shape[0]
        short, long_ = windows
        sa = self.scalars[:2 * L].view(L, 2)
        smear_l, skip_l = self.scalars[2 * L], self.scalars[2 * L + 1]
        # fp32 parameters, rounded to bf16 in the forward even in an fp32 model, as the record [H1509-1512]
        r_attn, r_mlp = self.resid_lambdas[:, 0].bfloat16(), self.resid_lambdas[:, 1].bfloat16()
        p_attn, p_mlp = self.post_lambdas[:, 0].bfloat16(), self.post_lambdas[:, 1].bfloat16()
        qk = self.qk_bank.view(L - 1, -1, C)
        vo = self.vo_bank.view(L - 1, 2 * C, C)
        attn_w = torch.cat([qk, vo], dim=1)  # (L - 1, 4C, C): rows Q, K (head-pair blocks), V, O [H1523-1525]

        x = F.embedding(ids, self.embed)
        bigram = ops.bigram_embed(ids, self.bigram_embed, self.bigram_sign_table)  # (T, C)
        ve_all = self.value_embeds.view(5, Vp, C)[:, ids]  # (5, T, C)
        smear = smear_l * torch.sigmoid(F.linear(x[1:, :12], self.smear_gate))
        x = torch.cat([x[:1], x[1:] + smear * x[:-1]])
        x = x0 = _norm(x)
        gates = _Gates(L)
        gates.unpack_pre(self._mudd_gate(x0, 0, PRE_LANES))
        x = x0 + bigram * gates.bigram[0]
        cache = {0: x}
        for i in range(L):
            mu = None
            if i == 4:
                gates.unpack_post(self._mudd_gate(x, 1, POST_LANES))
            if i == NO_ATTENTION_LAYER:
                x = x + torch.sigmoid(skip_l) * gates.skip * cache[3]
            else:
                w = attn_w[i - (i > NO_ATTENTION_LAYER)]
                attn_in = _norm(cache.get(7, x))
                table = VALUE_LAYERS.get(i)
                aux_v = None
                if i == L - 1:
                    cache[9] = x
                    mu = self._mudd(x, 0, 14)
                    v_mudd = (mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * x).view(T, H, D)
                    x = (1 + mu[5]) * x + mu[3] * cache[0] + mu[4] * cache[7]
                    ve_gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(H // 2, dim=-1).unsqueeze(-1)
                    aux_v = (ve_gate * ve_all[table].view(T, H, D) + v_mudd).view(T, C)
                elif table is not None:
                    gate_in = torch.cat([attn_in[..., :6], ve_all[table][..., :6]], dim=-1)
                    g = 2 * torch.sigmoid(F.linear(gate_in, self.ve_gate_bank[table])).view(T, H, 1)
                    aux_v = (g * ve_all[table].view(T, H, D)).view(T, C)
                window = long_ if i in LONG_LAYERS else short
                a = self._attention(i, attn_in, w, sa[i], window, rope, scale, cu_seqlens, aux_v, gates)
                if mu is not None:
                    x = mu[8] * x + mu[9] * a + mu[10] * cache[0]
                    x = x + mu[11] * bigram
                else:
                    x = r_attn[i] * x + p_attn[i] * a + x0 * gates.x0[i]
                    if i != 0:
                        x = x + bigram * gates.bigram[i]
            scales = self.fp8_scales[i] if self.fp8 and self.training else None  # eval runs bf16 [H1498]
            m = ops.relu2_mlp(_norm(x), self.mlp_bank[2 * i], self.mlp_bank[2 * i + 1].t(), scales)
            x = mu[12] * x + mu[13] * m if mu is not None else r_mlp[i] * x + p_mlp[i] * m
            if i in CACHE_LAYERS:
                cache[i] = x
        mu = self._mudd(x, 1, 5)
        x = x + mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * cache[9] + mu[3] * ve_all[0].to(x.dtype) \
            + mu[4] * cache[3]
        return _norm(x)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor, step: StepInputs,
                reduction: str = "mean") -> torch.Tensor:
        """The loss of one packed sequence (ids, targets: (T,) or the loaders' (1, T)): the training head
        (step.mtp_weights, step.prefix_weight) in training mode, plain cross-entropy of the rescaled logits in eval
        mode [H1683-1692]; reduction "mean" (the trainer's; the record sums, the recipe's grad_scale makes up the
        difference) or "none" (per-token, (T,))."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        ids, targets = ids.reshape(-1), targets.reshape(-1)
        h = self.hidden(ids, cu_seqlens, step.windows, step.rope, step.scale)
        if self.training:
            prefix = self.prefix_table[targets]
            losses = self.ops.mtp_head(h, self.lm_head, targets, step.mtp_weights, prefix, step.prefix_weight)
        else:
            logits = s89.LOGIT_A * torch.sigmoid((h @ self.lm_head.type_as(h) + s89.LOGIT_B) / s89.LOGIT_C)
            losses = F.cross_entropy(logits.float(), targets, reduction="none")
        return losses if reduction == "none" else losses.mean()


@dataclass
class StepInputs:
    """What one step's forward takes from the schedule: windows (short, long) in tokens, the rotary tables and the
    softmax scale (speedrun89.yarn_at), the multi-token-prediction weights (a (K,) fp32 tensor) and the prefix-token
    loss weight (a 0-d fp32 tensor: a new value each step, no recompile)."""
    windows: tuple[int, int]
    rope: dict
    scale: float
    mtp_weights: torch.Tensor
    prefix_weight: torch.Tensor


def step_inputs(schedule: s89.Schedule89, step: int, positions: int, head_dim: int, device,
                final: bool = False) -> StepInputs:
    """StepInputs of `step` for sequences up to `positions` tokens: windows from the stage (the final validation's
    long window with final=True), YaRN frequencies and scale from speedrun89.yarn_at, the loss weights."""
    freq, scale = s89.yarn_at(schedule, step, head_dim)
    rope = {"plain": tuple(t.to(device) for t in s89.rotary_tables(freq, positions)),
            "paired": tuple(t.to(device) for t in s89.rotary_tables(freq, positions, paired=True))}
    return StepInputs(schedule.windows(step, final), rope, scale,
                      torch.tensor(schedule.mtp_weights(step), dtype=torch.float32, device=device),
                      torch.tensor(schedule.prefix_weight(step), dtype=torch.float32, device=device))
