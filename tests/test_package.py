"""The project is one import package, `tritonrun`, that shadows nothing and installs as a library.

- From the repo root (where `python train_speedrun.py` and the suite run) transformers' GPT-2 and our kernels import
  in one process: the repo no longer holds a top-level `kernels` that hides Hugging Face's package of that name
  (transformers >= 5 imports it with every model).
- No generic top-level name (`kernels`, `gpt2`, `data`) resolves to a module of this repo, from the root or from a
  bench script (bench/kernels.py must never become `kernels`).
- `pip install --target DIR .` puts `tritonrun` and nothing else there, and the kernels work from another directory.
- Checkpoints written before the move (tests/fixtures/premove, written at 21a1c21 by the old top-level modules) load
  and resume with today's code, continuing the old run's losses.
"""
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_same_numbers, one_thread_env

REPO = Path(__file__).resolve().parents[1]
PREMOVE = REPO / "tests" / "fixtures" / "premove"
GENERIC = ("kernels", "gpt2", "data")
BENCH_SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))


def _python(code: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env or one_thread_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_transformers_gpt2_and_our_kernels_in_one_process_from_the_repo_root():
    """The issue's reproduction: `python -c` puts the working directory (the repo root) first on sys.path, as
    `python train_speedrun.py` does. Before the move this raised ImportError: cannot import name 'CUDAProperties'
    from 'kernels' (<repo>/kernels/__init__.py)."""
    pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[test]' brings it)")
    code = ("from transformers import GPT2LMHeadModel\n"
            "import tritonrun.kernels.attention as a, tritonrun.kernels.cross_entropy as ce\n"
            "import transformers.integrations.hub_kernels\n"  # the module that imports Hugging Face's `kernels`
            "print(a.__file__); print(ce.__file__)\n")
    proc = _python(code, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert all(Path(f).is_relative_to(REPO / "tritonrun") for f in proc.stdout.split())


def _resolve_generic_names(first_on_path: str, cwd: Path) -> dict:
    """{name: file or folder it resolves to, or None} for each generic name, with `first_on_path` leading sys.path."""
    code = (f"import importlib.util, json, sys\nsys.path.insert(0, {first_on_path!r})\n"
            f"found = {{}}\nfor name in {GENERIC!r}:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    found[name] = None if spec is None else (spec.origin if spec.origin not in (None, 'namespace')\n"
            "                                             else list(spec.submodule_search_locations))\n"
            "print(json.dumps(found))\n")
    proc = _python(code, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _inside_repo_as_code(found) -> bool:
    """A module or regular package of the repo (a namespace folder of data files, such as data/fineweb10B/, shadows
    no installed package: Python takes any regular package on sys.path before namespace portions)."""
    return isinstance(found, str) and Path(found).resolve().is_relative_to(REPO)


@pytest.mark.parametrize("first", ["", "repo", "bench"])
def test_no_generic_top_level_name_resolves_into_the_repo(first):
    """From the root (sys.path[0] '' under -c, the repo's path under `python train_speedrun.py`) no generic name is
    a module of ours. With bench/ first, as `python bench/X.py` starts, bench/kernels.py IS found as `kernels`:
    which is why every bench script takes bench/ off sys.path before it imports anything (next test)."""
    path = {"": "", "repo": str(REPO), "bench": str(REPO / "bench")}[first]
    found = _resolve_generic_names(path, cwd=REPO)
    shadowing = {name: where for name, where in found.items() if _inside_repo_as_code(where)}
    if first == "bench":
        assert shadowing == {"kernels": str(REPO / "bench" / "kernels.py")}
    else:
        assert shadowing == {}


def test_bench_scripts_take_their_folder_off_sys_path():
    """Each bench script's preamble, run as `python bench/X.py` runs it (bench/ first on sys.path), leaves no
    generic name resolving into the repo and puts this checkout's tritonrun first."""
    code = ("import importlib.util, json, runpy, sys\n"
            f"repo = {str(REPO)!r}\nout = {{}}\n"
            f"for script in {BENCH_SCRIPTS!r}:\n"
            "    sys.path.insert(0, repo + '/bench')\n"
            "    runpy.run_path(repo + '/bench/' + script, run_name='preamble_only')\n"  # module body, not main()
            "    specs = {n: importlib.util.find_spec(n) for n in ('kernels', 'gpt2', 'data', 'tritonrun')}\n"
            "    out[script] = {n: s and s.origin for n, s in specs.items()}\n"
            "    for n in ('kernels', 'gpt2', 'data'): sys.modules.pop(n, None)\n"
            "print(json.dumps(out))\n")
    proc = _python(code, cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(found) == BENCH_SCRIPTS
    for script, names in found.items():
        assert names["tritonrun"] == str(REPO / "tritonrun" / "__init__.py"), script
        assert not any(_inside_repo_as_code(names[n]) for n in GENERIC), (script, names)


def test_a_data_folder_shadows_no_installed_package(tmp_path):
    """`--data` defaults to data/fineweb10B and HellaSwag to data/hellaswag/: a folder of data files, no Python.
    Even first on sys.path it loses to an installed package named `data`, and without one it is an empty namespace
    that no code of ours imports."""
    root = tmp_path / "clone"
    (root / "data" / "fineweb10B").mkdir(parents=True)
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    (site / "data" / "__init__.py").write_text("WHO = 'installed'\n")
    env = {**one_thread_env(), "PYTHONPATH": str(site)}
    proc = _python("import data; print(data.WHO)", cwd=root, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "installed", proc.stderr


def _pip_install_target(tmp_path: Path) -> Path:
    """`pip install --target DIR .` of a copy of the project's installable files (a build writes build/ and
    *.egg-info beside pyproject.toml: not into the checkout other tests run from). No dependencies: they are this
    environment's; no build isolation when setuptools is here (CI's and README's environments have it)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "tritonrun", src / "tritonrun", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "target"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", *isolation, "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def test_pip_install_target_is_a_library_usable_from_anywhere(tmp_path):
    """A normal (not editable) install holds the tritonrun package, every subpackage and nothing else at the top;
    from an unrelated directory the kernels import from there and run (here one attention forward and backward in
    the Triton interpreter, against the op's own plain-PyTorch reference)."""
    target = _pip_install_target(tmp_path)
    top = sorted(p.name for p in target.iterdir())
    assert top[0] == "tritonrun" and len(top) == 2 and top[1].startswith("tritonrun-") and top[1].endswith(
        ".dist-info"), top
    installed = {p.relative_to(target).as_posix() for p in (target / "tritonrun").rglob("*.py")}
    in_repo = {p.relative_to(REPO).as_posix() for p in (REPO / "tritonrun").rglob("*.py")}
    assert installed == in_repo
    corpus = {p.name for p in (target / "tritonrun" / "data" / "sample_corpus").iterdir()}
    assert corpus == {"manifest.json", "sample_val_000000.bin", "sample_train_000001.bin"}  # --data sample's shards
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import torch, tritonrun.kernels.attention as a, tritonrun.gpt2, tritonrun.data.loader\n"
            "import tritonrun.training, tritonrun.recipes, tritonrun.memory, tritonrun.data.sample as s\n"
            "assert len(s.sample_tokens()[1]) == s.manifest()['tokens'][s.TRAIN_NAME]\n"
            "print(a.__file__)\n"
            "torch.manual_seed(0)\n"
            "q, k, v = (torch.randn(1, 2, 19, 32, requires_grad=True) for _ in range(3))\n"
            "o = a.causal_attention(q, k, v); o.sum().backward()\n"
            "r = a.attention_reference(q, k, v)\n"
            "print(float((o - r).abs().max()))\n")
    env = {**one_thread_env(drop=("PYTHONPATH",)), "PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    proc = _python(code, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    where, err = proc.stdout.split()
    assert Path(where).is_relative_to(target)
    assert float(err) < 1e-5  # fp32 both ways (tests/test_attention.py holds the op to its full tolerance rule)


# ------------------------------------------------------------------------- checkpoints written before the move
@pytest.mark.parametrize("recipe", ["gpt2", "speedrun-dense"])
def test_a_checkpoint_written_before_the_move_resumes_the_same_run(recipe, tmp_path, monkeypatch, one_torch_thread):
    """The fixture's step-2 checkpoint, written by 21a1c21's top-level modules, resumed through today's CLI with
    the argv it was written under: steps 3-4 and the step-4 val loss equal what the old code logged for its own
    uninterrupted 4 steps: bitwise on a machine like the fixture's (tests/helpers.assert_same_numbers)."""
    from tritonrun import train as train_speedrun
    from tritonrun.gpt2 import config as gpt2_config, speedrun as gpt2_speedrun
    from tritonrun.gpt2.checkpoint import load_checkpoint, read_model_config

    expected = json.loads((PREMOVE / recipe / "expected.json").read_text())
    shutil.copytree(PREMOVE / "data", tmp_path / "data")
    (tmp_path / "run").mkdir()
    shutil.copy(PREMOVE / recipe / "ckpt_00000002.pt", tmp_path / "run" / "ckpt_00000002.pt")
    monkeypatch.chdir(tmp_path)  # the checkpoint's run config names "data" and "run", relative
    ckpt = load_checkpoint(Path("run/ckpt_00000002.pt"))
    assert ckpt["step"] == 2 and ckpt["model_kind"] == recipe
    # the "tiny" name builds the fixture's smaller model, as it did while the fixture was written
    sizes = gpt2_speedrun.SPEEDRUN_DENSE_MODELS if recipe == "speedrun-dense" else gpt2_config.MODEL_SIZES
    monkeypatch.setitem(sizes, "tiny", read_model_config(Path("run/ckpt_00000002.pt")))

    assert train_speedrun.main([*expected["argv"], "--resume"]) == 0
    result = json.loads(Path("run/result.json").read_text())
    assert result["resumed_from"] and result["steps_done"] == 4
    assert [s["step"] for s in result["steps"]] == [1, 2, 3, 4]
    assert result["steps"][:2] == expected["steps"][:2]  # the old run's own records, carried by its checkpoint
    got = [(s["loss"], s["grad_norm"]) for s in result["steps"][2:]] + [result["val"][-1]["loss"]]
    want = [(s["loss"], s["grad_norm"]) for s in expected["steps"][2:]] + [expected["val"][-1]["loss"]]
    assert [v["step"] for v in result["val"]] == [v["step"] for v in expected["val"]] == [2, 4]
    flat = lambda pairs: [x for pair in pairs[:2] for x in pair] + pairs[2:]  # noqa: E731
    assert_same_numbers(flat(got), flat(want), expected)
    assert dataclasses.asdict(read_model_config(Path("run/ckpt_00000004.pt"))) == dataclasses.asdict(
        read_model_config(PREMOVE / recipe / "ckpt_00000002.pt"))
    assert os.path.exists("run/ckpt_00000004.pt")


def test_readme_kernel_example_runs_as_written():
    """README's "Use the kernels in your own model" example, with only its device/dtype line and its shape line
    made CPU-sized (the interpreter: fp32, small shapes), runs in a fresh process from another directory and its
    results equal the ops' references."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use the kernels in your own model"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    lines = code.splitlines()
    swap = {'device, dtype = "cuda", torch.bfloat16': 'device, dtype = "cpu", torch.float32',
            "B, H, T, D, C, V = 8, 12, 1024, 64, 768, 50257": "B, H, T, D, C, V = 1, 2, 19, 32, 40, 97"}
    assert sum(line.split("#")[0].strip() in swap for line in lines) == 2, "README example's config lines changed"
    code = "\n".join(swap.get(line.split("#")[0].strip(), line) for line in lines) + (
        "\nfrom tritonrun.kernels.attention import attention_reference\n"
        "from tritonrun.kernels.cross_entropy import linear_cross_entropy_reference\n"
        "assert torch.allclose(y, attention_reference(q, k, v), rtol=1e-4, atol=1e-5)\n"
        "assert torch.allclose(loss, linear_cross_entropy_reference(h, wte, targets, vocab_size=V), rtol=1e-5)\n"
        "assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v, h, wte))\n"
        "assert wte.grad[V:].abs().max() == 0\n"
        "print('ok')\n")
    env = {**one_thread_env(drop=("PYTHONPATH",)), "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    proc = _python(code, cwd=REPO / "tests", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("module", ["fineweb", "hellaswag", "sample"])
def test_data_commands_run_as_files_say_how_to_run_them(module):
    """`python tritonrun/data/fineweb.py` (the old `python data/fineweb.py`, moved) would put tritonrun/data/ first on
    sys.path, where loader.py, sample.py and tokenizer.py become top-level modules: it stops with the command."""
    proc = subprocess.run([sys.executable, f"tritonrun/data/{module}.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: run it as a module: python -m tritonrun.data.{module} --help\n"
