"""Rank documents for a query with any DiffEmbed folder or Hub id, through sentence-transformers.

    python examples/rank_with_sentence_transformers.py ./diffembed-demo/model
"""

import sys

from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], trust_remote_code=True)
query = "Return the number of items in a queue"
documents = [
    "def qsize(self):\n    return len(self._queue)",
    "def join(self):\n    self._finished.wait()",
    "def put_nowait(self, item):\n    self._put(item)",
]
scores = model.similarity(model.encode_query([query]), model.encode_document(documents))[0]
for score, document in sorted(zip(scores.tolist(), documents), reverse=True):
    print(f"{score:+.3f}  {document.splitlines()[0]}")
