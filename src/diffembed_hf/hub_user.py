"""A folder loaded as a Hub user would load it: in a fresh, offline Python process that cannot import
diffembed_hf, through `AutoModel` and `SentenceTransformer` with `trust_remote_code=True`.

This is what the demo checks its saved model with and what `diffembed push` validates a folder with before any
upload: if the remote code, the config, the tokenizer or the sentence-transformers files are wrong, this is
where it shows, because nothing of the installed package can mask it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DiffembedError

logger = logging.getLogger(__name__)

# Runs by path in a fresh isolated interpreter that cannot import diffembed_hf, offline: a Hub user's view.
_CHECK = Path(__file__).with_name("hub_user_check.py")
# What the check imports; `python -I` leaves out the user site and PYTHONPATH, so their folders are handed over.
_LIBRARIES = ("torch", "transformers", "sentence_transformers", "peft")


def _library_paths() -> list[str]:
    """The sys.path folders this interpreter finds the check's libraries in (none of them imported here)."""
    paths = []
    for name in _LIBRARIES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            root = str(Path(next(iter(spec.submodule_search_locations))).parent)
            if root not in paths:
                paths.append(root)
    return paths


class HubUserLoadError(DiffembedError):
    """The folder does not load (or does not embed) as a Hub user would load it; `reason` says which step."""

    def __init__(self, folder: str | Path, reason: str):
        super().__init__(f"{folder} does not load as a Hub user would load it: {reason}")
        self.reason = reason


@dataclass
class HubUserEmbeddings:
    auto_model: torch.Tensor  # AutoModel(...)(**tokenizer(texts)).embeddings, float32
    sentence_transformer: torch.Tensor  # SentenceTransformer(...).encode(texts), float32
    module: str  # where AutoModel's class came from (transformers_modules...: the folder's remote code)
    dtype: str  # the weights' dtype as loaded


def embed_as_hub_user(folder: str | Path, texts: list[str], *, base_model_path: str | Path | None = None,
                      max_length: int | None = None, timeout: float = 3600) -> HubUserEmbeddings:
    """Embed `texts` with `folder` loaded through `AutoModel` and `SentenceTransformer` (`trust_remote_code=True`)
    in a fresh offline process that cannot import diffembed_hf, with a private remote-code cache (the folder's
    own code runs, never a stale copy). For a LoRA adapter folder, `base_model_path` is its base model's local
    folder, loaded first with the adapter applied by PEFT. `max_length` truncates AutoModel's inputs."""
    with tempfile.TemporaryDirectory(prefix="diffembed-hub-user-") as tmp:
        out = Path(tmp) / "embeddings.json"
        # DIFFEMBED_DEBUG_CHECKS: the model checks ids and vectors on the host here (off in its hot path)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp) / "mods"),
                   DIFFEMBED_DEBUG_CHECKS="1")
        command = [sys.executable, "-I", str(_CHECK), str(folder), str(base_model_path or ""), json.dumps(texts),
                   str(max_length or ""), str(out), json.dumps(_library_paths())]
        # DEBUG: `folder` may be a staging folder whose temporary name means nothing to a user (push names its own)
        logger.debug("Loading %s in a fresh process (AutoModel and SentenceTransformer, offline)", folder)
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise HubUserLoadError(folder, f"loading it did not finish in {timeout:.0f} s") from err
        if result.returncode:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            logger.debug("Output of the fresh process:\n%s", result.stderr)
            reason = next((line.removeprefix("LOAD FAILED: ") for line in reversed(lines)
                           if line.startswith("LOAD FAILED")), None)
            raise HubUserLoadError(folder, reason or f"the fresh process exited with status {result.returncode}"
                                   + (f" ({lines[-1].strip()})" if lines else ""))
        payload = json.loads(out.read_text())
    return HubUserEmbeddings(torch.tensor(payload["auto_model"]), torch.tensor(payload["sentence_transformer"]),
                             payload["module"], payload["dtype"])
