"""Hard negatives by BM25 (the `bm25s` package, as in the study): full rankings with a deterministic order.

bm25s's `retrieve` returns a top-k whose order among equal scores is not specified; a run must give the same
negatives every time, so `BM25Ranking.rank` scores every document (`get_scores`) and sorts by score, then by
position. Tokenisation is bm25s's default (lower case, words of two or more characters, English stop words out).
"""

from __future__ import annotations

import numpy as np


class BM25Ranking:
    """BM25 (bm25s, Lucene variant, k1 = 1.5, b = 0.75) over a fixed list of texts."""

    def __init__(self, texts: list[str]):
        import bm25s

        self._bm25s = bm25s
        self.size = len(texts)
        self.retriever = bm25s.BM25()
        if texts:
            self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        tokens = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        ids = self.retriever.get_tokens_ids(tokens) if self.size else []
        if not ids:  # no query word is in the corpus: every document scores 0
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(ids))

    def rank(self, query: str) -> list[int]:
        """Every document's index, best first; equal scores keep the documents' order."""
        scores = self.scores(query)
        return np.lexsort((np.arange(self.size), -scores)).tolist()
