"""Text from a checkpoint, a Hugging Face GPT-2 directory or an llm.c model file: `python sample.py --help`.
The code lives in tritonrun/generate.py; this file only runs it.

    python sample.py --checkpoint runs/my-run --prompt "The meaning of life is" --num-samples 3
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's tritonrun, from any working directory

from tritonrun.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
