"""Rank documents for a query with any DiffEmbed folder or Hub id, through sentence-transformers.

    python examples/rank_with_sentence_transformers.py ./diffembed-demo/model
    python examples/rank_with_sentence_transformers.py --smoke    # a tiny random DiffEmbed folder (CPU, seconds)
"""

import sys
import tempfile

from sentence_transformers import SentenceTransformer


def smoke_folder() -> str:
    """A 2-layer random DiffEmbed model with Dream's tokenizer, saved as a sentence-transformers folder."""
    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding, load_dream_tokenizer
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    config = DiffEmbedConfig(vocab_size=151667, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=151643)
    folder = tempfile.mkdtemp(prefix="diffembed-example-smoke-")
    return str(save_sentence_transformer(DiffEmbedForEmbedding(config).eval(), load_dream_tokenizer(), folder))


model = SentenceTransformer(smoke_folder() if sys.argv[1] == "--smoke" else sys.argv[1], trust_remote_code=True)
query = "Return the number of items in a queue"
documents = [
    "def qsize(self):\n    return len(self._queue)",
    "def join(self):\n    self._finished.wait()",
    "def put_nowait(self, item):\n    self._put(item)",
]
scores = model.similarity(model.encode_query([query]), model.encode_document(documents))[0]
for score, document in sorted(zip(scores.tolist(), documents), reverse=True):
    print(f"{score:+.3f}  {document.splitlines()[0]}")
