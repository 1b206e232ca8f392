"""Bad inputs a new user makes (issue 25): each gets one `error:` line and a non-zero exit, and loses no data.

Runs never share an out dir (a lock for the life of a run, default names created exclusively), bad token ids
are named, advice never leads in a circle, checkpoints fall back and finished records stay as they are,
--init-from decides the model, every numeric flag is range-checked, interrupted runs write no leaderboard row,
and README tells a newcomer what works. Real trainer subprocesses where the behaviour is end to end; the
config-level refusals run in process (train_speedrun.main), which is what the CLI calls.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tritonrun import train as train_speedrun
from tritonrun.data.sample import prepare_sample
from tritonrun.data.shards import find_shards, load_tokens, write_shard
from tritonrun.gpt2.checkpoint import list_checkpoints
from tests.helpers import HAS_CUDA, load_script, one_thread_env
from tests.test_train_cli import REPO, SMALL, assert_user_error, run_cli

UserError = train_speedrun.UserError


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_speedrun.py", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env())


def wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def main_error(capsys, *argv) -> str:
    """train_speedrun.main in this process: exit 2 and exactly one `error:` line on stderr, which is returned."""
    assert train_speedrun.main([*map(str, argv)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def record(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def snapshot(out: Path) -> dict[str, bytes]:
    """The run's files (records, log, checkpoints); not the lock file, whose text names its latest holder."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".tritonrun.lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (the end); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli(*SMALL, "--max-steps", 4, "--val-every", 2, "--checkpoint-every", 2, "--keep-checkpoints", 0,
                   "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -------------------------------------------------------------------------------- 1. one run per out dir
def test_a_live_run_holds_its_out_dir(tmp_path):
    """A second run or a --resume into the out dir of a run that is alive is refused, naming that run's pid;
    once it is SIGKILLed its lock is gone (the kernel drops a flock with its holder) and a --resume works."""
    out = tmp_path / "run"
    proc = start_cli(*SMALL, "--max-steps", 1000, "--val-every", 1000, "--checkpoint-every", 1,
                     "--keep-checkpoints", 1, "--timing-warmup-steps", 0, "--out-dir", out)
    try:
        wait_for(lambda: list_checkpoints(out), proc)
        assert train_speedrun.OutDirLock(out).holder().startswith(f"pid {proc.pid} on ")
        for argv in ([*SMALL, "--max-steps", 2, "--out-dir", out], ["--resume", "--out-dir", out]):
            assert_user_error(run_cli(*argv), f"--out-dir {out} is in use by a running run (pid {proc.pid} on ")
        assert proc.poll() is None, "the first run must still be alive"
    finally:
        proc.kill()
        proc.wait()
    assert train_speedrun.OutDirLock(out).holder() is None  # the lock file stays, the lock does not
    assert (out / ".tritonrun.lock").exists()
    # the stale lock blocks nothing: the config resolves and the out dir is claimed again
    cfg, path = train_speedrun.resolve_config(["--resume", "--out-dir", str(out)])
    assert path == list_checkpoints(out)[-1]
    _, lock = train_speedrun.claim_out_dir(out, resuming=True, default_name=False)
    lock.release()


def test_two_runs_started_together_into_one_out_dir(tmp_path):
    """Both start before either has written anything: exactly one trains, the other is refused with one line,
    and the winner's records are its own (before the lock, both exited 0 into the same files)."""
    out = tmp_path / "run"
    args = [*SMALL, "--max-steps", 2, "--val-every", 2, "--timing-warmup-steps", 0, "--out-dir", out]
    procs = [start_cli(*args, "--seed", seed) for seed in (1, 2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    winner = next(i for i, (rc, _, _) in enumerate(results) if rc == 0)
    loser_err = [ln for ln in results[1 - winner][2].splitlines() if ln.strip()]
    assert len(loser_err) == 1 and loser_err[0].startswith(f"error: --out-dir {out} "), loser_err
    assert "in use by a running run" in loser_err[0] or "already holds a run" in loser_err[0]
    assert record(out)["config"]["seed"] == (1, 2)[winner] and record(out)["status"] == "max_steps"
    assert (out / "train.log").read_text().count("\ncommit ") == 1


def test_default_out_dir_names_never_collide(tmp_path, monkeypatch):
    """The default name (runs/<time>-<preset>-<model>) has one-second resolution: it is created exclusively,
    and a name that exists gets -2, -3, ..."""
    monkeypatch.chdir(tmp_path)
    cfg, _ = train_speedrun.resolve_config([*SMALL])
    assert re.fullmatch(r"runs/\d{8}-\d{6}-cpu-tiny", cfg.out_dir)
    base = Path(cfg.out_dir)
    claimed = []
    for _ in range(3):
        path, lock = train_speedrun.claim_out_dir(base, resuming=False, default_name=True)
        claimed.append(path)
        lock.release()
    assert claimed == [base, base.with_name(base.name + "-2"), base.with_name(base.name + "-3")]
    assert all(p.is_dir() for p in claimed)


def test_under_torchrun_only_rank_0_claims_the_out_dir(tmp_path, monkeypatch):
    """Rank 0 alone writes the out dir, so it alone takes the lock: rank 1 must neither be refused by it nor
    create a default-named directory of its own."""
    out = tmp_path / "run"
    path, lock = train_speedrun.claim_out_dir(out, resuming=False, default_name=False)
    try:
        monkeypatch.setenv("RANK", "1")
        assert train_speedrun.claim_out_dir(out, resuming=False, default_name=False) == (out, None)
        assert train_speedrun.claim_out_dir(tmp_path / "d", resuming=False, default_name=True)[1] is None
        assert not (tmp_path / "d").exists()
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match=f"pid {os.getpid()} on "):
            train_speedrun.claim_out_dir(out, resuming=False, default_name=False)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------ 2. bad token ids
def _data_dir(tmp_path: Path, val_tokens: np.ndarray, train: list[np.ndarray]) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "x_val_000000.bin", val_tokens)
    for i, tokens in enumerate(train):
        write_shard(d / f"x_train_{i + 1:06d}.bin", tokens)
    return d


def _sample_tokens(split: str, n: int) -> np.ndarray:
    return np.asarray(load_tokens(find_shards(prepare_sample(), split)[0])[:n], dtype=np.int64)


def test_bad_val_shard_is_refused_before_training(tmp_path):
    """An id in the vocabulary padding (50300) in the val shard: one line naming the file and position at
    startup, before a step runs (it used to crash at the first validation, leaving result.json "running")."""
    val = _sample_tokens("val", 4000)
    val[3001] = 50300
    d = _data_dir(tmp_path, val, [_sample_tokens("train", 4000)])
    out = tmp_path / "o"
    proc = run_cli(*SMALL, "--data", d, "--max-steps", 2, "--out-dir", out)
    assert_user_error(proc, f"bad shard {d / 'x_val_000000.bin'}: token id 50300 at position 3001 ")
    assert "step " not in proc.stdout and not (out / "result.json").exists()


def test_bad_train_shard_midway_checkpoints_and_resumes(tmp_path):
    """The second train shard holds id 50257: the run reaches it at step 3, stops with one line naming it,
    leaves a step-2 checkpoint at the step boundary and a "bad_data" record; with the shard fixed, --resume
    finishes the run."""
    good = _sample_tokens("train", 2 * 512 + 1)  # exactly two steps of 2 x 4 x 64 tokens
    second = _sample_tokens("train", 3000)[::-1].copy()
    fixed = second.copy()
    second[777] = 50257
    d = _data_dir(tmp_path, _sample_tokens("val", 4000), [good, second])
    out = tmp_path / "o"
    args = [*SMALL, "--data", d, "--max-steps", 4, "--val-every", 100, "--timing-warmup-steps", 0, "--out-dir", out]
    proc = run_cli(*args)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert f"bad shard {d / 'x_train_000002.bin'}: token id 50257 at position 777 " in err[0]
    assert "stopped before step 3, ckpt_00000002.pt written" in err[0] and f"--resume --out-dir {out}" in err[0]
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_00000002.pt"]
    assert record(out)["status"] == "bad_data" and record(out)["steps_done"] == 2
    write_shard(d / "x_train_000002.bin", fixed)
    proc = run_cli("--resume", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert record(out)["status"] == "max_steps" and len(record(out)["train_losses"]) == 4


# ----------------------------------------------------------------------------- 3. advice that leads somewhere
def test_a_run_without_checkpoint_is_not_sent_in_a_circle(tmp_path, capsys):
    """An out dir with result.json and no checkpoint: the new-run refusal must not say --resume, and the
    --resume refusal must not say "drop --resume"; each names something that works."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "running", "steps_done": 0}))
    line = main_error(capsys, *SMALL, "--out-dir", out)
    assert "no checkpoint to continue from" in line and "--resume" not in line
    assert "pick a new --out-dir" in line and f"rm -r {out}" in line
    line = main_error(capsys, "--resume", "--out-dir", out)
    assert "no checkpoint (ckpt_*.pt) to continue from" in line and "drop --resume" not in line
    assert "new --out-dir" in line
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]
    # the advice works: a new out dir trains (resolution and claim; the training itself is tested elsewhere)
    cfg, _ = train_speedrun.resolve_config([*SMALL, "--out-dir", str(tmp_path / "new")])
    train_speedrun.claim_out_dir(Path(cfg.out_dir), resuming=False, default_name=False)[1].release()


# ------------------------------------------------------------------------------------------ 4. checkpoints
def test_truncated_newest_checkpoint_falls_back_with_a_warning(finished, tmp_path):
    """README promises the newest complete checkpoint: a newest one cut short is skipped with a warning naming
    both files, and the run continues bitwise from the older one."""
    out = copy_run(finished, tmp_path / "run")
    newest = out / "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    rec = record(out)
    rec["status"] = "interrupted"  # as if the run had been stopped there
    (out / "result.json").write_text(json.dumps(rec))
    proc = run_cli("--resume", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and str(out / "ckpt_00000002.pt") in warnings[0]
    resumed = record(out)
    assert resumed["resumed_from"][-1]["step"] == 2 and resumed["status"] == "max_steps"
    assert resumed["train_losses"] == record(finished)["train_losses"]


def test_resume_of_a_finished_run_is_refused_unless_max_steps_is_raised(finished, tmp_path, capsys):
    """--resume on a finished run used to exit 0 and rewrite its record (step_ms_median 0.0, a second log
    header); now it is one line and nothing changes. A raised --max-steps trains the run further."""
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    for extra in ([], ["--max-steps", "4"], ["--max-steps", "3"]):
        line = main_error(capsys, "--resume", "--out-dir", out, *extra)
        assert "is finished (4 of --max-steps 4)" in line and "raise --max-steps" in line
    assert "train it further with --resume --max-steps" in main_error(capsys, *SMALL, "--out-dir", out)
    assert snapshot(out) == before
    proc = run_cli("--resume", "--out-dir", out, "--max-steps", 6)
    assert proc.returncode == 0, proc.stderr
    rec = record(out)
    assert rec["steps_done"] == 6 and rec["config"]["max_steps"] == 6 and rec["status"] == "max_steps"
    assert rec["train_losses"][:4] == record(finished)["train_losses"] and rec["step_ms_median"] > 0
    target = copy_run(finished, tmp_path / "target")
    rec = record(target)
    rec.update(status="target_reached", target_reached=True, target_reached_step=4)
    (target / "result.json").write_text(json.dumps(rec))
    line = main_error(capsys, "--resume", "--out-dir", target, "--max-steps", 8)
    assert "reached its target at step 4" in line and f"--init-from ckpt:{target}" in line


# ---------------------------------------------------------------------------------------- 5. --init-from
def test_init_from_decides_the_model(finished, capsys):
    """--init-from ckpt:RUN with another --model used to train the checkpoint's model and record the flag's; now
    it is refused, and without --model the checkpoint's is taken. --seq-len is checked against that model."""
    line = main_error(capsys, *SMALL, "--init-from", f"ckpt:{finished}", "--model", "d12", "--out-dir", "unused")
    assert "holds model tiny" in line and "not --model d12" in line
    line = main_error(capsys, *SMALL, "--init-from", f"ckpt:{finished}", "--model", "d12", "--seq-len", 512,
                      "--out-dir", "unused")
    assert "holds model tiny" in line
    no_model = [a for a in SMALL if a not in ("--model", "tiny")]
    line = main_error(capsys, *no_model, "--init-from", f"ckpt:{finished}", "--seq-len", 512, "--out-dir", "unused")
    assert "--seq-len 512 exceeds model tiny's context of 256" in line
    cfg, _ = train_speedrun.resolve_config([*no_model, "--init-from", f"ckpt:{finished}", "--out-dir", "unused"])
    assert cfg.model == "tiny"
    assert "--init-from ckpt:" in main_error(capsys, *SMALL, "--init-from", f"ckpt:{finished}/nope",
                                             "--out-dir", "unused")


def test_init_from_model_mismatch_end_to_end(finished, tmp_path):
    proc = run_cli(*SMALL, "--init-from", f"ckpt:{finished}", "--model", "d12", "--seq-len", 512,
                   "--out-dir", tmp_path / "o")
    assert_user_error(proc, "not --model d12")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- 6. flags
@pytest.mark.parametrize("flag, value, needle", [
    ("--beta1", "1.5", "--beta1 must be in [0, 1), got 1.5"),
    ("--beta2", "1", "--beta2 must be in [0, 1), got 1.0"),
    ("--beta1", "nan", "--beta1 must be a finite number"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number (>= 0), got nan"),
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0"),
    ("--target-val-loss", "nan", "--target-val-loss must be a finite number"),
    ("--target-val-loss", "inf", "--target-val-loss must be a finite number"),
    ("--grad-clip", "inf", "--grad-clip must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--lr", "0", "--lr must be a positive number"),
    ("--final-lr-frac", "nan", "--final-lr-frac must be a finite number"),
    ("--memory-gib", "nan", "--memory-gib must be a finite number"),
    ("--peak-tflops", "-1", "--peak-tflops must be >= 0"),
    ("--peak-tflops", "nan", "--peak-tflops must be a finite number"),
    ("--seed", "-1", "--seed must be in [0, 2**64)"),
    ("--warmup-steps", "-1", "--warmup-steps must be >= 0"),
    ("--max-bad-steps", "-2", "--max-bad-steps must be >= 0"),
    ("--val-every", "0", "--val-every must be positive"),
])
def test_numeric_flags_are_finite_and_in_range(capsys, tmp_path, flag, value, needle):
    line = main_error(capsys, *SMALL, flag, value, "--out-dir", tmp_path / "o")
    assert needle in line, line
    assert not (tmp_path / "o").exists()


def test_beta_out_of_range_end_to_end(tmp_path):
    """Used to be a traceback from inside torch's optimizer."""
    assert_user_error(run_cli(*SMALL, "--beta1", "1.5", "--out-dir", tmp_path / "o"), "--beta1 must be in [0, 1)")


# ---------------------------------------------------------------------------------- 8. README, as read first
README = (REPO / "README.md").read_text()


def test_readme_quick_start_installs_cpu_torch_first_in_a_virtual_environment():
    """README leads with the GPU block (install, then the main job with --download for its first run), apart from
    the CPU block (virtual environment, CPU torch, install, smoke run, sample, pytest); the CPU torch line says
    what to run off CI."""
    blocks = [b.split("```", 1)[0] for b in README.split("```bash\n")[1:]]
    gpu = blocks[0].splitlines()
    assert 'pip install -e ".[test]"' in gpu[0] and gpu[1].startswith("python train_speedrun.py --gpu rtx4070 --download")
    block = next(b for b in blocks if "pip install torch==2.13.0" in b)
    assert "--gpu rtx4070" not in block  # the main job sits apart from the CPU block
    assert "--index-url https://download.pytorch.org/whl/cpu" in README.split("## ", 1)[0]
    lines = block.splitlines()
    cpu = next(i for i, ln in enumerate(lines) if ln.startswith("pip install torch==2.13.0"))
    assert "python -m pip install torch==2.13.0" in (REPO / ".ci" / "run").read_text()  # CI installs as README says
    install = next(i for i, ln in enumerate(lines) if 'pip install -e ".[test]"' in ln)
    venv = next(i for i, ln in enumerate(lines) if "venv" in ln)
    assert venv < cpu < install
    head = README.split("## ", 1)[0]
    assert "a virtual environment" in head and "Python ≥ 3.10" in head
    assert any(ln.startswith("python sample.py --checkpoint runs/") for ln in lines)
    assert re.search(r"pytest .*about \d+(-\d+)? min on 2 CPU cores", block)


def test_readme_quotes_the_cuda_skip_reason_as_tests_print_it():
    reason = re.search(r'requires_cuda = .*reason="([^"]+)"', (REPO / "tests" / "conftest.py").read_text())[1]
    assert reason == "needs a CUDA GPU (none on this machine)"
    assert f"`{reason}`" in README


def test_readme_links_the_generated_ada_fit_document():
    """The register table lives in docs/ada-fit.md, exactly as bench/ada.py writes it from the committed record;
    README keeps a short summary and the link."""
    assert not [ln for ln in README.splitlines() if ln.startswith("| `")], "the kernel table moved out of README"
    section = README.split("## Ada fit\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/ada-fit.md)" in section and len(section.strip().splitlines()) <= 8
    ada = load_script("bench/ada.py", "ada_for_docs")
    [source] = set(re.findall(r"bench/results/ada-\d{8}\.json", section))  # the record README's summary names
    records = json.loads((REPO / source).read_text())
    want = ada.document(records, ["sm_89"], source, "docs/ada-fit.md")
    assert (REPO / "docs" / "ada-fit.md").read_text() == want
    assert f"All {sum(r['arch'] == 'sm_89' for r in records)} Triton kernel launches" in section


def test_ada_markdown_writes_the_document(tmp_path):
    out = tmp_path / "ada-fit.md"
    proc = subprocess.run([sys.executable, "bench/ada.py", "--markdown", "bench/results/ada-20261122.json",
                           "--arch", "sm_89", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("<!-- generated by `python bench/ada.py --markdown bench/results/ada-20261122.json")
    assert "\n# Ada fit\n" in text and text.count("\n| `") == 41


@pytest.mark.parametrize("argv, needle", [
    (["bench/memory.py", "--gpu", "rtx4070", "--recipe", "gpt2", "--seq-len", "0", "--micro-batch", "8"],
     "--seq-len 0: must be positive"),
    (["bench/memory.py", "--gpu", "rtx4070", "--budget-gib", "nan"], "--budget-gib"),
    (["bench/train.py", "--smoke", "--steps", "0"], "--steps must be positive"),
    (["bench/train.py", "--smoke", "--micro-batches", "0,-1"], "expected positive integers"),
    (["bench/train.py", "--smoke", "--cap-gib", "inf"], "--cap-gib must be a finite number"),
    (["bench/recipes.py", "--smoke", "--out-dir", "README.md"], "is a file, not a directory"),
    (["-m", "tritonrun.data.fineweb", "--tokenize", "--shard-tokens", "0", "--out-dir", "OUT"],
     "--shard-tokens must be in [1, 2**31), got 0"),
    ([".ci/gpu_check.py", "OUT", "--budget", "nan"], "--budget nan"),
    ([".ci/gpu_check.py", "OUT", "--budget", "inf", "--dry-run"], "--budget inf"),
])
def test_every_tools_numeric_flags_are_validated(argv, needle, tmp_path):
    """The benches and the GPU check validate their flags as the trainer does: one line, exit 2, nothing written."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITONRUN_CACHE": str(tmp_path / "cache")})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
        proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_CUDA, reason="lists the skips of a machine without CUDA; this one has CUDA")
def test_every_cuda_skip_says_it_needs_cuda_and_why(tmp_path):
    """README: a test skipped for want of CUDA says so first (`needs CUDA` or `needs a CUDA GPU`) and why; no skip
    names a wrong cause (the old "no bf16 arithmetic": the interpreter runs those cases)."""
    listing = tmp_path / "skips.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q", "tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITONRUN_SKIP_REASONS": str(listing)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    skips = json.loads(listing.read_text())
    cuda = [(node, why) for node, why in skips if "CUDA" in why or "GPU" in why]
    assert len(cuda) > 50, len(cuda)
    bad = [(node, why) for node, why in cuda if not why.startswith(("needs CUDA", "needs a CUDA GPU", "on a GPU",
                                                                    "on a CUDA machine", "checks the no-"))]
    assert not bad, bad[:5]
    assert not [node for node, why in skips if "no bf16 arithmetic" in why]


def test_hellaswag_asked_for_without_its_file_is_one_line(tmp_path):
    """--hellaswag-every N (or --hellaswag-path) naming a file that does not exist stops at startup with the command
    that writes it; left at its default, a missing file only turns the eval off (logged)."""
    missing = tmp_path / "nope.bin"
    assert_user_error(run_cli(*SMALL, "--hellaswag-every", "2", "--hellaswag-path", missing, "--out-dir",
                              tmp_path / "o"), "does not exist", "python -m tritonrun.data.hellaswag",
                      "--hellaswag-every 0")
    assert not (tmp_path / "o").exists()


def test_a_runaway_loss_stops_the_run_like_a_nan(tmp_path):
    """--lr 1e30 under the speedrun recipe gives finite losses near 30 with grad norm 0 (nothing is NaN): past
    --max-bad-steps such steps in a row the run stops, naming the step, the loss and the flag to lower, and its
    record says diverged, not finished."""
    out = tmp_path / "run"
    proc = run_cli("--gpu", "cpu", "--recipe", "speedrun", "--model", "tiny", "--data", "sample", "--seq-len", "256",
                   "--total-batch-tokens", "512", "--val-tokens", "512", "--lr", "1e30", "--max-steps", "12",
                   "--max-bad-steps", "1", "--out-dir", out)
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 3 and len(err) == 1 and "runaway (loss far above its start)" in err[0], proc.stderr
    assert "lower --lr (now 1e+30)" in err[0] and "last at step" in err[0]
    rec = json.loads((out / "result.json").read_text())
    assert rec["status"] == "diverged" and rec["steps_done"] < 12 and not (out / "leaderboard.md").exists()


PACKED_FLAGS = ["--gpu", "cpu", "--recipe", "speedrun", "--model", "tiny", "--seq-len", "256",
                "--total-batch-tokens", "512", "--val-tokens", "512", "--max-steps", "2"]


@pytest.mark.parametrize("case", ["short_dense", "no_eot", "all_eot", "short_packed"])
def test_data_that_cannot_make_one_batch_is_found_at_startup(tmp_path, case):
    """A train shard shorter than one dense micro-batch; a packed run's shards without any end-of-text token, with
    nothing else, or all shorter than one sequence: one line naming the file and the fix, exit 2, before the out
    dir claims a run (nothing written there)."""
    val = _sample_tokens("val", 4000)
    train = {"short_dense": [_sample_tokens("train", 200), _sample_tokens("train", 40000)],
             "no_eot": [np.arange(1000, 21000) % 50000],
             "all_eot": [np.full(20000, 50256)],
             "short_packed": [_sample_tokens("train", 200)]}[case]
    d = _data_dir(tmp_path, val, train)
    out = tmp_path / "out"
    flags = [*SMALL, "--max-steps", "2"] if case == "short_dense" else PACKED_FLAGS
    needle = {"short_dense": "x_train_000001.bin holds 200 tokens, fewer than one micro-batch (micro-batch x seq-len "
                             "+ 1 = 257)",
              "no_eot": "has no end-of-text token", "all_eot": "nothing but end-of-text tokens",
              "short_packed": "fewer than one micro-batch (seq-len + 1 = 257)"}[case]
    assert_user_error(run_cli(*flags, "--data", d, "--out-dir", out), needle)
    assert not out.exists()
