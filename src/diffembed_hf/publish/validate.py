"""Validation before a push: the staged folder loaded as a Hub user would (`hub_user.embed_as_hub_user`).

The push is refused unless `AutoModel` and `SentenceTransformer` (`trust_remote_code=True`, in a fresh offline
process that cannot import diffembed_hf) both load the folder and give finite unit vectors that agree. What was
validated is exactly what is uploaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PublishError
from ..hub_user import HubUserLoadError, embed_as_hub_user

logger = logging.getLogger(__name__)

TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France."]


def validate_folder(folder: str | Path, *, base_model_path: str | Path | None = None, timeout: float = 3600,
                    name: str | Path | None = None) -> dict:
    """Load `folder` as a Hub user would and refuse it unless it works: both loaders give finite unit vectors
    that agree (1e-5 in float32, 2e-2 in lower precision). For an adapter folder, `base_model_path` is its base
    model's local folder, loaded first with the adapter applied by PEFT. `name` is what messages call the folder
    (the user's folder, when `folder` stages it).

    Returns what was checked (remote-code module, dtype, dimension, largest difference); raises PublishError.
    """
    name = name or folder
    logger.info("Validating %s: loading it in a fresh offline process with AutoModel and SentenceTransformer", name)
    try:
        loaded = embed_as_hub_user(folder, TEXTS, base_model_path=base_model_path, timeout=timeout)
    except HubUserLoadError as err:
        raise PublishError(f"{name} does not load as a Hub user would load it, so it was not pushed: "
                           f"{err.reason}") from None
    auto, sentence = loaded.auto_model, loaded.sentence_transformer
    problem = None
    if not (torch.isfinite(auto).all() and torch.isfinite(sentence).all()):
        problem = "the embeddings are not finite (NaN or inf)"
    else:
        norms = sentence.norm(dim=-1)
        difference = (F.normalize(auto, dim=-1) - sentence).abs().max().item()
        tolerance = 1e-5 if loaded.dtype == "torch.float32" else 2e-2
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            problem = (f"SentenceTransformer's embeddings are not unit vectors (norms {norms.tolist()}): degenerate "
                       "weights?")
        elif difference > tolerance:
            problem = f"AutoModel and SentenceTransformer disagree by {difference:.2e} (> {tolerance:g})"
    if problem is not None:
        raise PublishError(f"{name} does not load as a Hub user would load it, so it was not pushed: {problem}")
    return {"module": loaded.module, "dtype": loaded.dtype, "dimension": sentence.shape[1],
            "max_difference": difference}
