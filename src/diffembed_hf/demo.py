"""The built-in default, end to end and offline: build a small DiffEmbed model with the real Dream tokenizer,
save it as a Hub-ready folder (transformers and sentence-transformers files), reload it as a Hub user would
(`AutoModel` and `SentenceTransformer`, `trust_remote_code=True`, in a process without this package) and rank
a few documents for a query.

The default model is **untrained** (random weights): its ranking shows that the pipeline runs, not that
the embeddings mean anything. Fine-tuning it is a later step of this project.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .modeling.configuration_diffembed import DiffEmbedConfig
from .modeling.modeling_diffembed import DiffEmbedForEmbedding
from .sentence_transformer import save_sentence_transformer
from .tokenization import load_dream_tokenizer

logger = logging.getLogger(__name__)

# Dream's vocabulary, RoPE base and attention geometry (GQA, head_dim 32) at a size that runs on a laptop CPU.
DEFAULT_CONFIG = dict(
    vocab_size=152064,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
)

QUERY = "Given a question, retrieve passages that answer it: how do plants turn sunlight into energy?"
DOCUMENTS = [
    "Photosynthesis converts light energy into chemical energy stored in glucose, inside chloroplasts.",
    "The French Revolution began in 1789 and ended the absolute monarchy in France.",
    "A hash table maps keys to values and offers average constant-time lookups.",
    "Chlorophyll absorbs red and blue light, which drives the light-dependent reactions in leaves.",
]


def build_default_model(seed: int = 0) -> DiffEmbedForEmbedding:
    """The small default DiffEmbed model, randomly initialised (reproducibly, from `seed`)."""
    torch.manual_seed(seed)
    return DiffEmbedForEmbedding(DiffEmbedConfig(**DEFAULT_CONFIG)).eval()


@torch.inference_mode()
def encode(model, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 512) -> torch.Tensor:
    """Normalised float32 embeddings of `texts`, one row each."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).embeddings


# Runs in a fresh interpreter that cannot import diffembed_hf: exactly what a Hub user without the package has.
_HUB_USER_SCRIPT = """
import json, sys
sys.modules["diffembed_hf"] = None
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
folder, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
with torch.inference_mode():
    embeddings = model(**batch).embeddings
st_embeddings = SentenceTransformer(folder, trust_remote_code=True).encode(texts, convert_to_tensor=True)
with open(out, "w") as f:
    json.dump({"module": type(model).__module__, "embeddings": embeddings.tolist(),
               "st_embeddings": st_embeddings.tolist()}, f)
"""


def embed_as_hub_user(folder: str | Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Embed `texts` with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and with
    `SentenceTransformer(folder, trust_remote_code=True)` in a fresh process that cannot import diffembed_hf;
    returns both embeddings and the module the model class came from."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "embeddings.json"
        result = subprocess.run(
            [sys.executable, "-c", _HUB_USER_SCRIPT, str(folder), json.dumps(texts), str(out)],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
        )
        if result.returncode:
            raise RuntimeError(f"Loading {folder} with trust_remote_code failed:\n{result.stderr[-3000:]}")
        payload = json.loads(out.read_text())
    return torch.tensor(payload["embeddings"]), torch.tensor(payload["st_embeddings"]), payload["module"]


def run_demo(output_dir: str | Path) -> list[tuple[float, str]]:
    """Build, save, reload through the Hub remote-code path, and rank `DOCUMENTS` for `QUERY` by cosine."""
    output_dir = Path(output_dir)
    model, tokenizer = build_default_model(), load_dream_tokenizer()
    save_sentence_transformer(model, tokenizer, output_dir, max_seq_length=512)
    logger.info("Saved a Hub-ready DiffEmbed folder (transformers + sentence-transformers) to %s", output_dir)

    embeddings, st_embeddings, module = embed_as_hub_user(output_dir, [QUERY, *DOCUMENTS])
    logger.info("Reloaded with AutoModel and SentenceTransformer (trust_remote_code) in a fresh process; "
                "class from %s", module)
    if not torch.allclose(embeddings, encode(model, tokenizer, [QUERY, *DOCUMENTS]), atol=1e-5):
        raise RuntimeError("The reloaded model embeds differently from the one that was saved.")
    if not torch.allclose(st_embeddings, embeddings, atol=1e-5):
        raise RuntimeError("SentenceTransformer and AutoModel embed the saved folder differently.")
    scores = (embeddings[:1] @ embeddings[1:].T)[0].tolist()
    return sorted(zip(scores, DOCUMENTS), reverse=True)
