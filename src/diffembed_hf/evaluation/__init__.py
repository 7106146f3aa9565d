"""Evaluation: the training-time held-out evaluator (`heldout`) and the study's benchmarks on stock mteb 2.x.

`heldout` needs only sentence-transformers; everything else (`run.evaluate`, `diffembed evaluate`) needs the
`[eval]` extra (mteb), imported only when used, so that training and publishing never pull it in.
"""

from __future__ import annotations

from ..errors import EvaluationError

__all__ = ["EvaluateOptions", "EvaluationError", "evaluate"]


def __getattr__(name: str):
    if name == "EvaluateOptions":  # its module runs mteb only when `evaluate` is called
        from .run import EvaluateOptions

        return EvaluateOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate(*args, **kwargs):
    """See `diffembed_hf.evaluation.run.evaluate` (imported lazily: it needs mteb)."""
    from .run import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
