"""DDP through torchrun (gloo on CPU): 2 ranks equal 1 process with twice the grad accumulation."""
import json
import subprocess
import sys

from tests.helpers import one_thread_env
from tests.test_train_cli import REPO, SMALL, run_cli

# micro-batch 2 x 64 tokens, 512 tokens/step: 1 process accumulates 4 micro-batches, each of 2 ranks 2.
ARGS = [*SMALL, "--micro-batch", 2, "--max-steps", 4, "--val-every", 2, "--val-tokens", 1024]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    single = tmp_path / "single"
    proc = run_cli(*ARGS, "--out-dir", single)
    assert proc.returncode == 0, proc.stderr

    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_speedrun.py", *map(str, ARGS), "--out-dir", str(ddp)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-4000:]

    a, b = (json.loads((d / "result.json").read_text()) for d in (single, ddp))
    assert b["world_size"] == 2 and b["grad_accum"] == a["grad_accum"] == 4
    assert len(b["train_losses"]) == len(a["train_losses"]) == 4
    for x, y in zip(a["train_losses"], b["train_losses"]):
        assert abs(x - y) <= 1e-6, (a["train_losses"], b["train_losses"])
    for x, y in zip(a["val"], b["val"]):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 1e-6
    # rank 0 alone writes the log: one header, one line per step
    log = (ddp / "train.log").read_text()
    assert log.count("\ncommit ") == 1 and "x 2 ranks" in log
    assert sum(ln.startswith("step ") for ln in log.splitlines()) == 4
