"""A DiffEmbed folder as a sentence-transformers model, checked against the model's own forward pass."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentence_transformers
import torch
from safetensors.numpy import load_file

from diffembed_hf import DiffEmbedForEmbedding, load_dream_tokenizer
from diffembed_hf.cli import main as cli_main
from diffembed_hf.encoding import encode, load_encoder
from diffembed_hf.sentence_transformer import (
    DEFAULT_QUERY_PROMPT,
    TASK_PROMPTS,
    default_prompts,
    write_sentence_transformer_files,
)

pytestmark = pytest.mark.versions  # CI reruns it on the oldest transformers / sentence-transformers

ST_MAJOR = int(sentence_transformers.__version__.split(".")[0])
TEXTS = ["Photosynthesis turns light into chemical energy.", "def add(a, b):\n    return a + b", "短い文", " "]
MAX_LEN = 48


@pytest.fixture(scope="module")
def tokenizer():
    return load_dream_tokenizer()


MODEL = dict(seed=3, max_seq_length=MAX_LEN, pad_token_id=0)  # `tiny_folders(**MODEL)`, the real Dream tokenizer


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)


@pytest.fixture(scope="module")
def folder_without_prompt(tiny_folders):
    return tiny_folders(**MODEL, include_prompt=False)


def st_text(text):
    """sentence-transformers 5 strips every input before tokenizing it; 6 does not."""
    return text if ST_MAJOR >= 6 else text.strip()


def reference(folder, tokenizer, texts, prompt="", include_prompt=True):
    """Embeddings from DiffEmbedForEmbedding itself: prompt + text, mean over real tokens (minus the prompt's)."""
    model = DiffEmbedForEmbedding.from_pretrained(folder).eval()
    batch = tokenizer([st_text(prompt + t) for t in texts], padding=True, truncation=True, max_length=MAX_LEN,
                      return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    if include_prompt:
        return out.embeddings.numpy()
    mask = batch["attention_mask"].clone()
    mask[:, : len(tokenizer(st_text(prompt))["input_ids"])] = 0  # right padding: the prompt is each row's prefix
    mean = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


HUB_USER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.modules["diffembed_hf"] = None  # a user who has only sentence-transformers
    from sentence_transformers import SentenceTransformer
    folder, texts, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    model = SentenceTransformer(folder, trust_remote_code=True)
    results = {
        "plain": model.encode(texts), "query": model.encode(texts, prompt_name="query"),
        "encode_query": model.encode_query(texts), "encode_document": model.encode_document(texts),
        "max_seq_length": np.array(model.max_seq_length), "module": np.array(type(model[0].auto_model).__module__),
    }
    results["similarity"] = model.similarity(results["plain"], results["query"]).numpy()
    model.save(out + ".saved")
    results["reloaded"] = SentenceTransformer(out + ".saved", trust_remote_code=True).encode(texts)
    np.savez(out, **results)
    """
)


def as_hub_user(folder, tmp_path):
    out = tmp_path / "out.npz"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    subprocess.run([sys.executable, "-c", HUB_USER, str(folder), *TEXTS, str(out)], check=True, env=env,
                   stdin=subprocess.DEVNULL, timeout=300)
    return dict(np.load(out))


def test_folder_layout(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling",
            "2_Normalize", "config.json", "modeling_diffembed.py", "tokenizer.json"} <= names


def test_sentence_transformers_in_a_fresh_process_equals_the_model(folder, tokenizer, tmp_path):
    got = as_hub_user(folder, tmp_path)
    assert str(got["module"]).startswith("transformers_modules")
    assert int(got["max_seq_length"]) == MAX_LEN
    plain = reference(folder, tokenizer, TEXTS)
    query = reference(folder, tokenizer, TEXTS, DEFAULT_QUERY_PROMPT)
    np.testing.assert_allclose(got["plain"], plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["query"], query, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["encode_query"], query, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["encode_document"], plain, rtol=1e-5, atol=1e-5)  # documents carry no prompt
    np.testing.assert_allclose(got["similarity"], plain @ query.T, rtol=1e-5, atol=1e-5)  # cosine of unit vectors
    np.testing.assert_allclose(got["reloaded"], plain, rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain, query, atol=1e-3)


def test_prompt_tokens_can_be_excluded_from_the_mean(folder_without_prompt, tokenizer, tmp_path):
    got = as_hub_user(folder_without_prompt, tmp_path)
    expected = reference(folder_without_prompt, tokenizer, TEXTS, DEFAULT_QUERY_PROMPT, include_prompt=False)
    np.testing.assert_allclose(got["query"], expected, rtol=1e-5, atol=1e-5)
    with_prompt = reference(folder_without_prompt, tokenizer, TEXTS, DEFAULT_QUERY_PROMPT)
    assert not np.allclose(got["query"], with_prompt, atol=1e-3)


@pytest.mark.parametrize("prompt", list(default_prompts().values()))
def test_prompt_tokens_are_a_prefix_of_prompt_plus_text(tokenizer, prompt):
    """sentence-transformers counts the prompt's tokens separately: they must be the prefix of the joint text,
    or excluding the prompt would cut into the text (prompts end at a pre-tokenizer boundary, ':\\n')."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    for text in ("what is a theorem?", "Euler", "  indented", "42 apples", "日本"):
        assert tokenizer(prompt + text)["input_ids"][: len(prompt_ids)] == prompt_ids


@pytest.mark.skipif(ST_MAJOR < 6, reason="sentence-transformers < 6 never flattens batches")
def test_sentence_transformers_flattening_gives_the_same_vectors(folder, monkeypatch):
    """sentence-transformers 6 packs a batch (DataCollatorWithFlattening) when flash attention is configured;
    force that on CPU: the packed batch must embed exactly as the padded one."""
    from transformers import modeling_flash_attention_utils

    model = sentence_transformers.SentenceTransformer(str(folder), trust_remote_code=True)
    padded = model.encode(TEXTS, prompt_name="query")
    transformer = model[0]
    monkeypatch.setattr(type(transformer), "_is_flash_attention_requested", lambda self: True)
    monkeypatch.setattr(modeling_flash_attention_utils, "lazy_import_flash_attention",
                        lambda *a, **k: ((None, lambda *x: None), None))
    transformer.unpad_inputs = True
    assert transformer.can_flatten_inputs
    seen = []
    hook = transformer.auto_model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.keys()),
                                                            with_kwargs=True)
    flat = model.encode(TEXTS, prompt_name="query")
    hook.remove()
    assert all("cu_seq_lens_q" in keys for keys in seen)
    np.testing.assert_allclose(flat, padded, rtol=1e-5, atol=1e-5)


def test_write_files_refuses_what_is_not_a_diffembed_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_sentence_transformer_files(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="bert"):
        write_sentence_transformer_files(tmp_path)


def test_named_task_prompts_are_stored(folder):
    model = load_encoder(str(folder), device="cpu")
    assert model.prompts["theoremqa_theorems"] == TASK_PROMPTS["theoremqa_theorems"]
    assert model.prompts["document"] == "" and model.similarity_fn_name == "cosine"


# ---- the encode experience ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(folder):
    return load_encoder(str(folder), device="cpu")


def test_encoder_dtypes(folder, encoder):
    assert encoder[0].auto_model.dtype == torch.float32  # CPU default
    half = load_encoder(str(folder), device="cpu", dtype=torch.bfloat16)
    assert half[0].auto_model.dtype == torch.bfloat16
    vectors = encode(half, TEXTS[:2], convert_to_tensor=True)
    assert vectors.dtype == torch.float32  # pooled and normalised in fp32
    cosine = (vectors * encode(encoder, TEXTS[:2], convert_to_tensor=True)).sum(-1)
    assert cosine.min() > 0.99


def test_encode_outputs_and_empty_input(encoder, folder, tokenizer):
    array = encode(encoder, TEXTS)
    assert isinstance(array, np.ndarray) and array.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(array, reference(folder, tokenizer, TEXTS), rtol=1e-5, atol=1e-5)
    tensor = encode(encoder, TEXTS, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and torch.allclose(tensor, torch.from_numpy(array), atol=1e-6)
    assert encode(encoder, TEXTS[0]).shape == (64,)
    assert encode(encoder, []).shape == (0, 64)
    assert encode(encoder, [], convert_to_tensor=True).shape == (0, 64)


@pytest.mark.parametrize("bad, position", [([None], 0), (["ok", 3], 1), (["ok", "fine", ["nested"]], 2)])
def test_bad_items_name_their_position(encoder, bad, position):
    with pytest.raises(TypeError, match=rf"texts\[{position}\]"):
        encode(encoder, bad)
    with pytest.raises(TypeError, match="sequence of strings"):
        encode(encoder, 42)


def test_empty_and_whitespace_texts_embed_without_nan(encoder):
    vectors = encode(encoder, ["", "   ", "\n", "text"])
    assert np.isfinite(vectors).all()
    assert np.allclose(vectors[0], 0)  # nothing to embed: a zero vector, documented
    # whitespace is a token (sentence-transformers 5 strips it first, leaving nothing: a zero vector again)
    assert np.isclose(np.linalg.norm(vectors[1]), 1 if ST_MAJOR >= 6 else 0, atol=1e-5)
    alone = encode(encoder, [""])
    assert alone.shape == (1, 64) and np.allclose(alone, 0)


def test_truncation_warns_once_and_honours_max_length(encoder, folder, tokenizer, caplog):
    long_text = "many words here " * 100
    with caplog.at_level(logging.WARNING, logger="diffembed_hf.encoding"):
        vectors = encode(encoder, [long_text, "short", long_text])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3" in warnings[0].getMessage()
    assert f"max_seq_length={MAX_LEN}" in warnings[0].getMessage()
    np.testing.assert_allclose(vectors[0], reference(folder, tokenizer, [long_text])[0], rtol=1e-5, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffembed_hf.encoding"):
        encode(encoder, ["short"])
    assert not caplog.records


MANY_TEXTS = textwrap.dedent(
    """
    import sys, numpy as np
    from diffembed_hf.encoding import encode, load_encoder

    def rss_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024

    model = load_encoder(sys.argv[1], device="cpu")
    texts = [f"text number {i} " + "word " * (i % 40) for i in range(10_000)]
    encode(model, texts[:64])
    before = rss_mb("VmRSS:")
    vectors = encode(model, texts, batch_size=64)
    assert vectors.shape == (10_000, 64) and np.isfinite(vectors).all()
    print("GROWTH", rss_mb("VmHWM:") - before)
    """
)


def test_ten_thousand_texts_show_progress_and_hold_memory_flat(folder):
    result = subprocess.run([sys.executable, "-c", MANY_TEXTS, str(folder)], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600, check=True)
    assert "10000/10000" in result.stderr.replace(" ", "") or "157/157" in result.stderr.replace(" ", "")
    growth = float(result.stdout.split("GROWTH")[1])
    # Keeping every batch's token states alive would take > 150 MB here (10k texts x ~30 tokens x 64 floats x
    # several tensors); released batches leave only the 2.5 MB of output plus allocator slack.
    assert growth < 60, f"peak RSS grew {growth:.0f} MB while encoding"


def test_encode_command(folder, encoder, tmp_path, monkeypatch, capsys):
    lines = ["first line of text", "短い文", "a third"]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli_main(["encode", str(folder), "-i", str(source), "-o", str(tmp_path / "e.npy"), "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), encode(encoder, lines), rtol=1e-5, atol=1e-6)
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"body": "alpha"}\n{"body": "beta"}\n', encoding="utf-8")
    assert cli_main(["encode", str(folder), "-i", str(jsonl), "--field", "body", "--prompt-name", "query",
                     "-o", str(tmp_path / "e.safetensors"), "--device", "cpu"]) == 0
    stored = load_file(tmp_path / "e.safetensors")["embeddings"]
    np.testing.assert_allclose(stored, encode(encoder, ["alpha", "beta"], prompt_name="query"), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("from stdin\n"))
    assert cli_main(["encode", str(folder), "-o", str(tmp_path / "s.npy"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "s.npy").shape == (1, 64)
    assert cli_main(["encode", str(folder), "-i", str(source), "-o", str(tmp_path / "e.csv")]) == 2
    assert ".npy or .safetensors" in capsys.readouterr().err and not (tmp_path / "e.csv").exists()
    assert not list(tmp_path.glob(".*partial"))
