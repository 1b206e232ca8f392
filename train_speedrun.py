"""The trainer's command line: `python train_speedrun.py --help`. The code lives in tritonrun/train.py (presets,
flags, out-dir bookkeeping) and tritonrun/training.py (the loop); this file only runs it.

    python train_speedrun.py --gpu rtx4070                              # the main job (--recipe speedrun)
    python train_speedrun.py --gpu cpu --model tiny --data sample       # CPU smoke run, no download
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's tritonrun, from any working directory

from tritonrun.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
