"""Validation before a push: the staged folder loaded as a Hub user would, in a fresh offline process.

The process cannot import diffembed_hf; it loads the folder through `AutoModel` and `SentenceTransformer` with
`trust_remote_code=True` and embeds two texts; the push is refused unless both give finite unit vectors that
agree. What was validated is exactly what is uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .files import PublishError

logger = logging.getLogger(__name__)

# Runs in a fresh interpreter that cannot import diffembed_hf, offline: what a Hub user has after downloading.
_VALIDATE_SCRIPT = r"""
import json, sys
sys.modules["diffembed_hf"] = None
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

folder, base, out = sys.argv[1], sys.argv[2] or None, sys.argv[3]
texts = ["What is the capital of France?", "Paris is the capital and largest city of France."]
device = "cuda" if torch.cuda.is_available() else "cpu"

def fail(message):
    sys.exit("VALIDATION FAILED: " + message)

def step(name, run):
    try:
        return run()
    except FloatingPointError as err:  # the model refuses to return a NaN embedding
        fail(f"{name}: the embeddings are not finite ({err})")
    except Exception as err:
        import traceback
        traceback.print_exc()
        fail(f"{name} raised {type(err).__name__}: {err}")

def auto_model():
    model = AutoModel.from_pretrained(base or folder, trust_remote_code=True).to(device).eval()
    module = type(model).__module__
    if not module.startswith("transformers_modules"):
        fail(f"AutoModel built {type(model).__name__} from {module}, not from the folder's remote code")
    dtype = str(next(model.parameters()).dtype)
    if base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(base or folder, trust_remote_code=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        return model(**batch).embeddings.float().cpu(), module, dtype

def sentence_transformer():
    st = SentenceTransformer(base or folder, trust_remote_code=True, device=device)
    if base:
        st.load_adapter(folder)
    return st.encode(texts, convert_to_tensor=True).float().cpu()

auto, module, dtype = step("AutoModel", auto_model)  # one model in memory at a time
sentence = step("SentenceTransformer", sentence_transformer)
if not (torch.isfinite(auto).all() and torch.isfinite(sentence).all()):
    fail("the embeddings are not finite (NaN or inf)")
norms = sentence.norm(dim=-1)
if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
    fail(f"SentenceTransformer's embeddings are not unit vectors (norms {norms.tolist()}): degenerate weights?")
difference = (F.normalize(auto, dim=-1) - sentence).abs().max().item()
tolerance = 1e-5 if dtype == "torch.float32" else 2e-2
if difference > tolerance:
    fail(f"AutoModel and SentenceTransformer disagree by {difference:.2e} (> {tolerance:g})")
with open(out, "w") as handle:
    json.dump({"module": module, "dtype": dtype, "dimension": sentence.shape[1], "max_difference": difference}, handle)
"""


def validate_folder(folder: str | Path, *, base_model_path: str | Path | None = None, timeout: float = 3600) -> dict:
    """Load `folder` as a Hub user would and refuse it unless it works: in a fresh offline process that cannot
    import diffembed_hf, through `AutoModel` and `SentenceTransformer` (`trust_remote_code=True`), embedding two
    texts; both must give finite unit vectors that agree (1e-5 in float32). For an adapter folder,
    `base_model_path` is its base model's local folder, loaded first with the adapter applied by PEFT.

    Returns what was checked (remote-code module, dtype, dimension, largest difference); raises PublishError.
    """
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="diffembed-validate-") as tmp:
        out = Path(tmp) / "report.json"
        # a private modules cache: the folder's own code is what runs, never a stale copy from an earlier load
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp) / "mods"))
        command = [sys.executable, "-c", _VALIDATE_SCRIPT, str(folder), str(base_model_path or ""), str(out)]
        logger.info("Validating %s in a fresh process (AutoModel and SentenceTransformer, offline)", folder)
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise PublishError(f"Validating {folder} did not finish in {timeout:.0f} s") from err
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            logger.debug("Validation output:\n%s", result.stderr)
            reason = next((line for line in reversed(lines) if line.startswith("VALIDATION FAILED")), None)
            raise PublishError(
                f"{folder} does not load as a Hub user would load it, so it was not pushed: "
                + (reason or "\n" + "\n".join(lines[-25:]))
            )
        return json.loads(out.read_text())

