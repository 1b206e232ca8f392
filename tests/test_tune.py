"""tritonrun/kernels/tune.py: the host-side autotuner's choice, its disk cache and its failure modes.

The timing function and the device description are replaced (no GPU here); what each candidate's launch
does is the caller's business, so the launches below only count calls. tests/test_cross_entropy.py runs the
tuner through the real cross-entropy launches (interpreter) and, on a GPU, with real timings.
"""
import json

import pytest
import torch

from tritonrun.kernels import tune

CANDIDATES = [{"BLOCK": 128, "num_warps": 8}, {"BLOCK": 64, "num_warps": 4}, {"BLOCK": 256, "num_warps": 8}]


class FakeClock:
    """time_ms stand-in: runs fn once (as do_bench would, many times) and reports ms[i] for the i-th call."""

    def __init__(self, ms):
        self.ms, self.calls = list(ms), 0

    def __call__(self, fn):
        fn()
        t = self.ms[self.calls]
        self.calls += 1
        if isinstance(t, BaseException):
            raise t
        return t


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A pretend GPU 0 and a private Triton cache dir."""
    monkeypatch.setattr(tune, "describe", lambda device: ("NVIDIA GeForce RTX 4070", "8.9", 46))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setattr(tune, "spills_of_first_launch", lambda launch: 0)  # no candidate spills (tested below)
    return torch.device("cuda")


def launcher():
    seen = []
    return seen, lambda cfg: seen.append(cfg)


def test_picks_the_fastest_and_caches_it_on_disk(gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(tune, "time_ms", FakeClock([3.0, 1.5, 2.0]))
    seen, launch = launcher()
    tuner = tune.Tuner("demo", tune.__file__)
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launch) == CANDIDATES[1]
    assert seen == CANDIDATES  # each candidate launched (timed) once
    (d,) = tuner.decisions()
    assert (d["key"], d["how"], d["config"], d["ms"]) == ("fwd/4096", "measured", CANDIDATES[1], [3.0, 1.5, 2.0])
    saved = json.loads(tuner.path(gpu).read_text())
    assert saved["fwd/4096"]["config"] == CANDIDATES[1]
    assert tuner.path(gpu).parent == tmp_path / "triton" / "tritonrun"  # beside Triton's own cache

    # same process: from memory, nothing timed or launched
    monkeypatch.setattr(tune, "time_ms", FakeClock([]))
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launch) == CANDIDATES[1] and len(seen) == 3
    # a new process (fresh tuner): from the disk cache, nothing timed
    fresh = tune.Tuner("demo", tune.__file__)
    assert fresh.pick(gpu, ("fwd", 4096), CANDIDATES, launch) == CANDIDATES[1] and len(seen) == 3
    assert fresh.decisions()[0]["how"] == "cached"
    # another key is tuned on its own, and both keys stay in the file
    monkeypatch.setattr(tune, "time_ms", FakeClock([1.0, 2.0, 3.0]))
    assert fresh.pick(gpu, ("fwd", 8192), CANDIDATES, launch) == CANDIDATES[0]
    assert set(json.loads(fresh.path(gpu).read_text())) == {"fwd/4096", "fwd/8192"}


def test_cache_is_per_device_and_kernel_source(gpu, monkeypatch, tmp_path):
    """The file name digests the device, the Triton/torch versions and the kernel file: a different GPU or an
    edited kernel does not reuse a pick."""
    tuner = tune.Tuner("demo", tune.__file__)
    a = tuner.path(gpu)
    monkeypatch.setattr(tune, "describe", lambda device: ("NVIDIA H100 80GB HBM3", "9.0", 132))
    b = tuner.path(gpu)
    edited = tmp_path / "kernel.py"
    edited.write_bytes(open(tune.__file__, "rb").read() + b"# edited\n")
    c = tune.Tuner("demo", str(edited)).path(gpu)
    assert len({a, b, c}) == 3 and all(p.name.startswith("demo-") for p in (a, b, c))


def test_a_pick_outside_the_candidates_is_retuned(gpu, monkeypatch):
    """A cached config that is no longer a candidate is not used."""
    path = tune.Tuner("demo", tune.__file__).path(gpu)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fwd/4096": {"config": {"BLOCK": 512, "num_warps": 16}}}))
    monkeypatch.setattr(tune, "time_ms", FakeClock([2.0, 1.0, 3.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1]) == CANDIDATES[1]
    assert tuner.decisions()[0]["how"] == "measured"


def test_damaged_cache_is_retuned_with_a_warning(gpu, monkeypatch, capsys):
    path = tune.Tuner("demo", tune.__file__).path(gpu)
    path.parent.mkdir(parents=True)
    path.write_text('{"fwd/4096": {"config"')  # a torn write from some other tool
    monkeypatch.setattr(tune, "time_ms", FakeClock([2.0, 1.0, 3.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1]) == CANDIDATES[1]
    assert capsys.readouterr().err.count("ignoring unreadable tuning cache") == 1
    assert json.loads(path.read_text())["fwd/4096"]["config"] == CANDIDATES[1]  # rewritten whole


def test_unwritable_cache_keeps_the_pick_for_this_process(gpu, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tune, "time_ms", FakeClock([2.0, 1.0, 3.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    blocker = tmp_path / "triton"
    blocker.write_text("a file where the cache dir should be")
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1]) == CANDIDATES[1]
    assert "could not save the tuning cache" in capsys.readouterr().err


def test_candidates_that_do_not_fit_are_skipped(gpu, monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(tune, "time_ms", FakeClock([OutOfResources(232_448, 101_376, "shared memory"), 2.0, 1.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1]) == CANDIDATES[2]
    assert tuner.decisions()[0]["ms"] == [None, 2.0, 1.0]


def test_out_of_memory_candidate_is_skipped_and_the_pick_not_saved(gpu, monkeypatch):
    """Tuning inside a run near its memory cap: a candidate whose buffers do not fit is skipped, and the pick,
    made without it, holds for this process only."""
    monkeypatch.setattr(tune, "time_ms", FakeClock([2.0, torch.OutOfMemoryError("CUDA out of memory"), 3.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1]) == CANDIDATES[0]
    (d,) = tuner.decisions()
    assert d["ms"] == [2.0, None, 3.0] and d["how"].startswith("measured (not saved")
    assert not tuner.path(gpu).exists()


def test_no_candidate_fits_is_one_clear_error(gpu, monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(tune, "time_ms", FakeClock([OutOfResources(1, 0, "shared memory")] * 3))
    with pytest.raises(RuntimeError, match="no candidate config fits this GPU.*TRITONRUN_AUTOTUNE=0"):
        tune.Tuner("demo", tune.__file__).pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1])


def test_no_candidate_fits_in_memory_is_an_out_of_memory_error(gpu, monkeypatch):
    """When device memory is what every candidate lacked (at least one OOM, the rest out of resources), the
    error is an OutOfMemoryError, which the trainer and the benchmarks already handle as one; nothing is cached."""
    from triton.runtime.errors import OutOfResources

    oom = torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(tune, "time_ms", FakeClock([oom, OutOfResources(1, 0, "shared memory"), oom]))
    tuner = tune.Tuner("demo", tune.__file__)
    with pytest.raises(torch.OutOfMemoryError, match="no candidate config fits in the free device memory.*"
                                                     "lower --micro-batch"):
        tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1])
    assert not tuner.path(gpu).exists() and tuner.decisions() == []


def test_other_launch_errors_are_not_swallowed(gpu, monkeypatch):
    """A candidate that fails for any reason but resources is a bug: it propagates, nothing is cached."""
    monkeypatch.setattr(tune, "time_ms", FakeClock([1.0, ValueError("bad pointer arithmetic"), 2.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    with pytest.raises(ValueError, match="bad pointer"):
        tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1])
    assert not tuner.path(gpu).exists() and tuner.decisions() == []


@pytest.mark.parametrize("env,expect", [
    ({}, True), ({"TRITONRUN_AUTOTUNE": "1"}, True), ({"TRITONRUN_AUTOTUNE": "0"}, False),
    ({"TRITON_INTERPRET": "1"}, False), ({"TRITON_INTERPRET": "1", "TRITONRUN_AUTOTUNE": "1"}, False),
])
def test_autotune_switch(monkeypatch, env, expect):
    monkeypatch.delenv("TRITONRUN_AUTOTUNE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert tune.autotune_enabled() is expect


def test_cache_dir_follows_triton(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert tune.cache_dir() == tmp_path / "tritonrun"
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.delenv("TRITON_HOME", raising=False)
    assert tune.cache_dir() == tune.Path.home() / ".triton" / "cache" / "tritonrun"
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "home"))
    assert tune.cache_dir() == tmp_path / "home" / ".triton" / "cache" / "tritonrun"


def test_decisions_are_copies(gpu, monkeypatch):
    """Records get copies: editing one cannot change the kernel tables the candidates came from."""
    monkeypatch.setattr(tune, "time_ms", FakeClock([1.0, 2.0, 3.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1])
    d = tuner.decisions()[0]
    d["config"]["BLOCK"] = 1
    d["candidates"].clear()
    assert CANDIDATES[0]["BLOCK"] == 128 and len(CANDIDATES) == 3
    assert tuner.decisions()[0]["config"]["BLOCK"] == 128


def test_ptxas_rejection_is_skipped_like_out_of_resources(gpu, monkeypatch):
    """A candidate this arch's ptxas rejects (an arch whose space was not compile-checked) is skipped, as
    triton.autotune skips it."""
    from triton.runtime.errors import PTXASError

    monkeypatch.setattr(tune, "time_ms", FakeClock([PTXASError("ptxas error: too many resources"), 2.0, 1.0]))
    tuner = tune.Tuner("demo", tune.__file__)
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1]) == CANDIDATES[2]


def test_summary_line_names_each_pick():
    picks = {"attention": [{"kernel": "fwd", "arch": "sm_90", "D": 64, "key": ["1024", "64"],
                            "config": [128, 64, 8, 4]}],
             "cross_entropy": [{"key": "dw/bfloat16/16384/768/50257/50304", "how": "cached",
                                "config": {"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_K": 32, "BLOCK_C": 64,
                                           "num_warps": 8, "num_stages": 2, "programs_per_sm": 1}}]}
    assert tune.summary(picks) == ("attention.fwd[D=64]=128x64/w8s4, "
                                   "cross_entropy.dw/bfloat16/16384/768/50257/50304=256x128x32x64/w8s2 (cached)")
    assert tune.summary({}) == ""


def test_capture_policy_reuses_a_pick_else_runs_the_table(monkeypatch):
    """pick_unless_capturing (cross-entropy's and attention's shared CUDA-graph policy): a known pick wins even
    during a capture; during a capture with no pick the table runs and nothing is tuned; otherwise it tunes."""
    dev = torch.device("cuda")

    def never():
        pytest.fail("tuned during a capture")

    monkeypatch.setattr(tune, "capturing", lambda device: True)
    assert tune.pick_unless_capturing(dev, None, "table", never) == "table"
    assert tune.pick_unless_capturing(dev, "pick", "table", never) == "pick"
    monkeypatch.setattr(tune, "capturing", lambda device: False)
    assert tune.pick_unless_capturing(dev, None, "table", lambda: "tuned") == "tuned"
    assert tune.pick_unless_capturing(dev, "pick", "table", lambda: "tuned") == "pick"
    assert not tune.capturing(torch.device("cpu"))  # the real check: a CPU device never captures


def test_picks_reads_each_imported_kernel_module(monkeypatch):
    """picks() (what bench and training records list under "autotune") finds the kernel modules under their
    package names: it once looked for `kernels.attention`, which after the move to tritonrun/ is never imported,
    so every record's autotune field would have stayed empty."""
    from tritonrun.kernels import attention, cross_entropy

    made = {"attention": [{"kernel": "fwd", "D": 64, "config": [64, 64, 4, 3]}],
            "cross_entropy": [{"kernel": "lce_fwd", "config": {"BLOCK_N": 64}}]}
    monkeypatch.setattr(attention, "tuning_decisions", lambda: made["attention"])
    monkeypatch.setattr(cross_entropy, "tuning_decisions", lambda: made["cross_entropy"])
    assert tune.picks() == made


def test_a_candidate_that_spills_is_dropped_before_timing(gpu, monkeypatch):
    """The fastest candidate spills registers on this GPU (the compiled kernel says so): it is never timed, the
    next best is picked, and the record names it; when every candidate spills, the least bad is timed and kept."""
    spills = {128: 24, 64: 0, 256: 0}
    monkeypatch.setattr(tune, "spills_of_first_launch", lambda launch: spills[launch.__defaults__[0]["BLOCK"]])
    clock = FakeClock([2.0, 3.0])
    monkeypatch.setattr(tune, "time_ms", clock)
    tuner = tune.Tuner("demo", tune.__file__)
    assert tuner.pick(gpu, ("fwd", 4096), CANDIDATES, launcher()[1]) == CANDIDATES[1] and clock.calls == 2
    (d,) = tuner.decisions()
    assert d["ms"] == [None, 2.0, 3.0] and d["spilled"] == [CANDIDATES[0]]
    monkeypatch.setattr(tune, "spills_of_first_launch", lambda launch: 8)
    monkeypatch.setattr(tune, "time_ms", FakeClock([3.0, 1.5, 2.0]))
    assert tuner.pick(gpu, ("fwd", 8192), CANDIDATES, launcher()[1]) == CANDIDATES[1]


def test_spills_are_read_from_the_launched_kernels(monkeypatch):
    """spills_of_first_launch sums n_spills of the compiled kernels Triton's JITFunction.run returns during the
    launch (and leaves JITFunction.run as it was)."""
    from types import SimpleNamespace

    from triton.runtime.jit import JITFunction

    kernels = iter([SimpleNamespace(n_spills=16), SimpleNamespace(n_spills=0), None])
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: next(kernels))
    before = JITFunction.run
    assert tune.spills_of_first_launch(lambda: [JITFunction.run(None) for _ in range(3)]) == 16
    assert JITFunction.run is before


def test_attention_autotuner_prunes_spilling_configs(monkeypatch):
    """attention's triton.autotune drops, before timing, the configs whose compiled kernel spills; a config it
    cannot probe stays, and if all spill all stay."""
    from types import SimpleNamespace

    from tritonrun.kernels import attention as attn

    class Fake:
        def warmup(self, **kw):
            if kw["BLOCK_M"] == 32:
                raise RuntimeError("cannot probe")
            return SimpleNamespace(_init_handles=lambda: None, n_spills=8 if kw["BLOCK_M"] == 128 else 0)

    monkeypatch.setitem(attn.KERNELS, "fwd", Fake())
    cfgs = [SimpleNamespace(all_kwargs=lambda m=m: {"BLOCK_M": m, "num_warps": 4}) for m in (128, 64, 32)]
    kept = attn.drop_spilling("fwd")(cfgs, {"Q": None}, HEAD_DIM=64)
    assert [c.all_kwargs()["BLOCK_M"] for c in kept] == [64, 32]
    assert attn.drop_spilling("fwd")(cfgs[:1], {}) == cfgs[:1]
