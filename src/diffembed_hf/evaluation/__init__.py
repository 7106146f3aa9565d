"""Evaluation: the training-time held-out evaluator (`heldout`) and the study's benchmarks on stock mteb 2.x.

`heldout` needs only sentence-transformers; everything else (`run.evaluate`, `diffembed evaluate`) needs the
`[eval]` extra (mteb), imported only when used, so that training and publishing never pull it in.
"""

from __future__ import annotations

from ..errors import UsageError


class EvaluationError(UsageError, ValueError):
    """A user-fixable problem (a bad name, a bad data folder, a dataset out of reach); the message says which."""


def evaluate(*args, **kwargs):
    """See `diffembed_hf.evaluation.run.evaluate` (imported lazily: it needs mteb)."""
    from .run import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
