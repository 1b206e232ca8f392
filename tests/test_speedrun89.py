"""Record #89's schedule (tritonrun/gpt2/speedrun89.py) at the steps where something changes, by hand from the
record's formulas (module docstring). The full per-step comparison with the record's own code (its TrainingSchedule
and get_muon_momentum run on CPU outside the repo) found every stage, batch, document length, window, lr and momentum
equal at every step, and the MTP / prefix weights equal once rounded to fp32 (the record keeps them as fp32
tensors); that script is not part of the repo."""
import pytest

from tritonrun.gpt2.speedrun89 import LOG_SCHEDULE, Schedule89

S = Schedule89()


def test_stages_tokens_and_the_untie_step():
    assert S.bounds == [(0, 423), (423, 847), (847, 1270), (1270, 1285)]  # round(1270/3) = 423, round(2540/3) = 847
    assert S.untie_step == 847 and LOG_SCHEDULE.untie_step == 921  # 920 | 1
    assert S.tokens() == 423 * 131_072 + 424 * 262_144 + 438 * 393_216 == 338_821_120
    assert LOG_SCHEDULE.tokens() == 460 * 131_072 + 460 * 262_144 + 470 * 393_216 == 365_690_880
    assert [S.batch_tokens(s) for s in (0, 422, 423, 846, 847, 1284, 5000)] == \
        [131_072, 131_072, 262_144, 262_144, 393_216, 393_216, 393_216]
    assert [S.max_doc_len(s) for s in (0, 422, 423)] == [896, 896, 2048]


def test_lr_multiplier():
    cd = int(1270 * 0.4)  # 508: the cooldown's start

    def cooled(lr_mul, step):
        t = min(1.0, (step - cd) / (1270 - cd))
        return lr_mul * (1 - t) + 0.15 * t

    assert [S.lr_multiplier(s) for s in (0, 422, 423, 507)] == [1.0, 1.0, 1.52, 1.52]
    assert S.lr_multiplier(508) == 1.52 and S.lr_multiplier(700) == pytest.approx(cooled(1.52, 700), rel=1e-15)
    assert S.lr_multiplier(847) == pytest.approx(cooled(1.73, 847), rel=1e-15)  # jumps with the stage
    assert S.lr_multiplier(846) == pytest.approx(cooled(1.52, 846), rel=1e-15)
    assert S.lr_multiplier(1270) == S.lr_multiplier(1284) == 0.15  # the extension: the floor


def test_muon_momentum():
    assert [S.muon_momentum(s) for s in (0, 300, 1235)] == [0.85, 0.95, 0.95]
    assert S.muon_momentum(150) == pytest.approx(0.90, abs=1e-15)
    assert S.muon_momentum(1236) == pytest.approx(0.95 - 0.1 / 50, abs=1e-15)  # cooldown after 1285 - 50
    assert S.muon_momentum(1285) == pytest.approx(0.85, abs=1e-15)


def test_loss_weights_and_windows():
    assert S.mtp_weights(0) == (1.0, 0.5, 0.25)
    assert S.mtp_weights(211) == pytest.approx((1.0, 0.5, 0.25 * (1 - 211 / 423)), abs=1e-15)
    assert S.mtp_weights(423) == (1.0, 0.5) and S.mtp_weights(847) == (1.0,) and S.mtp_weights(1284) == (1.0,)
    assert S.prefix_weight(0) == S.prefix_weight(422) == 0.25 and S.prefix_weight(847) == 0.0
    assert S.prefix_weight(635) == pytest.approx(0.25 * (1 - (635 - 423) / 424), abs=1e-15)
    assert all(LOG_SCHEDULE.prefix_weight(s) == 0.0 for s in (0, 500, 1000))  # the logged code has no prefix loss
    assert [S.windows(s) for s in (0, 423, 847, 1270)] == [(128, 384), (384, 896), (640, 1408), (768, 1664)]
    assert S.windows(1284, final=True) == (768, 2560)


def test_a_malformed_schedule_is_refused():
    from dataclasses import replace

    from tritonrun.gpt2.speedrun89 import STAGES

    with pytest.raises(ValueError, match="sum to 1"):
        Schedule89(stages=(replace(STAGES[0], fraction=0.5), *STAGES[1:]))
    with pytest.raises(ValueError, match="one extension stage"):
        Schedule89(stages=STAGES[:-1])


def test_parameter_count_and_the_state_the_memory_plan_starts_from():
    """640,605,607 parameters on one GPU (the issue's 640.6M); parameters, gradients and optimizer state stored as the
    record stores them: 7.01 GiB; the plan's options for the tables' Adam state: bf16 moments save 1.80 GiB, host
    memory 3.60 GiB (the issue's +1.8 / +3.6 GiB of room for activations)."""
    from tritonrun.gpt2.speedrun89 import PARAMS, parameter_count, state_bytes

    GIB = 2**30
    assert parameter_count() == 640_605_607
    tables = sum(n for _, n, _, _, table in PARAMS if table)
    assert tables == 5 * 50_304 * 768 + 377_280 * 768 == 482_918_400
    full = state_bytes()
    assert round(full["total"] / GIB, 2) == 7.01
    assert full["total"] - state_bytes(table_moments="bf16")["total"] == tables * 4
    assert full["total"] - state_bytes(table_state_on_host=True)["total"] == tables * 8
    assert round(tables * 4 / GIB, 2) == 1.80 and round(tables * 8 / GIB, 2) == 3.60


def test_rotary_frequencies_yarn_and_scale():
    """Frequencies 1 .. 1/1024 on 32 adjacent pairs, 64 dims unrotated; the softmax scale 0.1 x (1 + 0.2 ln(new / old))
    at each long-window change (384 -> 896 -> 1408 -> 1664 tokens); YaRN leaves a frequency with fewer than 1
    rotation over the old window scaled by old / new, one with more than 32 untouched. The tables, scale and rotary()
    were bitwise equal to the record's own Yarn (plain and paired) at every stage outside the repo."""
    import math

    import torch

    from tritonrun.gpt2.speedrun89 import rotary, rotary_frequencies, rotary_tables, yarn_at, yarn_update

    f = rotary_frequencies(128)
    assert f[0] == f[1] == 1.0 and f[62] == f[63] == pytest.approx(1 / 1024) and (f[64:] == 0).all()
    scales = [yarn_at(S, s)[1] for s in (0, 423, 847, 1270)]
    want = [0.1]
    for old, new in ((384, 896), (896, 1408), (1408, 1664)):
        want.append(want[-1] * (1 + 0.2 * math.log(new / old)))
    assert scales == pytest.approx(want, rel=1e-15)
    g, factor = yarn_update(torch.tensor([1.0, 2 * math.pi / 384 * 0.5, 0.0]), 384, 896)
    assert factor == pytest.approx(1 + 0.2 * math.log(896 / 384))
    assert g[0] == 1.0  # 61 rotations over 384 tokens: untouched
    assert g[1].item() == pytest.approx(2 * math.pi / 384 * 0.5 * 384 / 896, rel=1e-6)  # half a rotation: scaled
    cos, sin = rotary_tables(f, 8)
    x = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    x[..., 0] = 1.0
    y = rotary(x, cos, sin)[0, :, 0]
    t = torch.arange(8.0)
    assert torch.equal(y[:, 0], t.cos().bfloat16()) and torch.equal(y[:, 1], (-t.sin()).bfloat16())
    assert rotary_tables(f, 8, paired=True)[0].shape == (8, 256)


def test_the_heads_loss_by_hand():
    """One row by hand (V = 5): the rescaled logits, the MTP terms that exist, the prefix term; the gradient equals
    autograd of the summed loss (with u rounded to bf16 as a constant cast) wherever every future target exists,
    and on the last rows carries the kernel's normalizer over all K weights."""
    import math

    import torch

    from tritonrun.gpt2.speedrun89 import mtp_loss_reference

    g = torch.Generator().manual_seed(0)
    N, V = 6, 5
    logits = torch.randn(N, V, generator=g) * 4
    targets = torch.tensor([1, 4, 0, 2, 2, 3])
    prefix = torch.tensor([-1, 3, 0, -1, 1, -1])
    w, p = (1.0, 0.5, 0.25), 0.25
    losses, dl = mtp_loss_reference(logits, targets, w, prefix, p)
    u = [[float(torch.tensor(1 / (1 + math.exp(-(x + 5) / 7.5))).bfloat16()) for x in row] for row in logits.tolist()]
    z = [[23 * v for v in row] for row in u]
    lse = [math.log(sum(math.exp(v) for v in row)) for row in z]
    want1 = sum(wk * (lse[1] - z[1][targets[1 + k]]) for k, wk in enumerate(w)) + p * (lse[1] - z[1][3])
    want5 = 1.0 * (lse[5] - z[5][3])  # the last row: only its own next token; no prefix
    assert losses[1].item() == pytest.approx(want1, rel=1e-5) and losses[5].item() == pytest.approx(want5, rel=1e-5)
    # autograd of the same loss through z = 23 sigmoid((l + 5) / 7.5) (u's bf16 rounding as a straight-through cast)
    raw = logits.clone().requires_grad_()
    s = torch.sigmoid((raw + 5) / 7.5)
    zz = 23 * (s + (s.bfloat16().float() - s).detach())
    lse_t = torch.logsumexp(zz, 1)
    total = 0
    for i in range(N):
        for k, wk in enumerate(w):
            if i + k < N:
                total = total + wk * (lse_t[i] - zz[i, targets[i + k]])
        if prefix[i] >= 0:
            total = total + p * (lse_t[i] - zz[i, prefix[i]])
    total.backward()
    sb = s.detach().bfloat16().float()
    autograd = raw.grad * (sb * (1 - sb)) / (s.detach() * (1 - s.detach()))  # the record's u (1 - u) uses bf16 u
    assert torch.allclose(dl[:4], autograd[:4], rtol=1e-4, atol=1e-6)  # fp32 softmax vs autograd's: a few ulps
    assert not torch.allclose(dl[5], autograd[5], rtol=1e-3)  # S_w counts w_1 + w_2 there; the loss does not
