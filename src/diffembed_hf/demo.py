"""The built-in default, end to end and offline.

1. Build a small DiffEmbed model (random weights) with the real Dream tokenizer, or, with `base`, convert a real
   pretrained model (a GGUF file, a folder holding one, or a checkpoint folder; a DiffEmbed folder is used as it is).
2. Build a real retrieval task from the running Python's standard library (docstring summary -> function
   source; training and held-out rows from disjoint modules; see `builtin_task`).
3. Score the untrained model and BM25 on the held-out rows, fine-tune the model contrastively
   (`train.train`), score it again.
4. Save it as a Hub-ready folder and reload it as a Hub user would (`AutoModel` and `SentenceTransformer`,
   `trust_remote_code=True`, in a process without this package); both must give the in-process vectors.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import register_auto_classes
from .builtin_task import write_task
from .checkpoint import read_json
from .data import load_training_data
from .errors import ModelFilesError
from .evaluation.heldout import evaluate_bm25
from .hub_user import embed_as_hub_user
from .modeling.configuration_diffembed import DiffEmbedConfig
from .modeling.modeling_diffembed import DiffEmbedForEmbedding
from .sentence_transformer import save_sentence_transformer
from .tokenization import load_dream_tokenizer
from .train import TrainingConfig, train

logger = logging.getLogger(__name__)
register_auto_classes()

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
    # the offline Dream tokenizer's ids (bos <|beginoftext|>, eos = pad <|endoftext|>), so that the model's
    # config and its tokenizer agree and no library has to "align" them
    bos_token_id=151665,
    eos_token_id=151643,
    pad_token_id=151643,
)

# A randomly initialised model has nothing to preserve, so the demo trains all weights (the recipe's LoRA is
# for pretrained backbones), at a learning rate a small model takes, on inputs cut to 128 tokens.
DEMO_TRAINING = dict(max_steps=400, batch_size=16, learning_rate=1e-3, warmup_steps=20, lora=False,
                     max_seq_length=128, gradient_checkpointing=False, save_steps=10**9, logging_steps=50)


# A pretrained backbone: the recipe's LoRA (r16 on all projections) at a learning rate that moves it within a short
# CPU run, inputs cut at 128 tokens as in the default demo; the rest is chosen for the device (`device_settings`).
BASE_TRAINING = dict(max_steps=60, batch_size=8, learning_rate=3e-4, max_seq_length=128, save_steps=10**9)


def prepare_base(base: str | Path, folder: Path, overwrite: bool = False) -> Path:
    """A DiffEmbed folder for `base`: used as it is if it already is one, else converted into `folder` (an earlier
    one replaced only once the new one is whole, with `overwrite`)."""
    from .convert import convert_checkpoint

    config = Path(base).expanduser() / "config.json"
    settings = read_json(config, ModelFilesError) if config.is_file() else {}  # a damaged one is named
    if isinstance(settings, dict) and settings.get("model_type") == "diffembed":
        return Path(base).expanduser()
    return convert_checkpoint(base, folder, overwrite=overwrite)


def build_default_model(seed: int = 0) -> DiffEmbedForEmbedding:
    """The small default DiffEmbed model, randomly initialised (reproducibly, from `seed`)."""
    torch.manual_seed(seed)
    return DiffEmbedForEmbedding(DiffEmbedConfig(**DEFAULT_CONFIG)).eval()


@torch.inference_mode()
def encode(model, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 512) -> torch.Tensor:
    """Normalised float32 embeddings of `texts`, one row each."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).embeddings


@dataclass
class DemoResult:
    folder: Path
    metrics: dict[str, dict[str, float]]  # untrained / fine-tuned / BM25 -> metric -> value
    train_rows: int
    heldout_rows: int
    train_seconds: float
    losses: list[float]
    steps: int


def run_demo(output_dir: str | Path, max_steps: int | None = None, max_heldout: int = 300,
             overwrite: bool = False, base: str | Path | None = None) -> DemoResult:
    """Build (or, from `base`, convert), fine-tune and evaluate a model on the standard-library task; save and
    reload it.

    `output_dir` must be new or empty unless `overwrite`, which replaces the demo's own data/, untrained/ and
    model/ in it (nothing else there is touched)."""
    from .files import check_output_folder, final_path, output_lock

    output_dir = final_path(Path(output_dir))  # a link the user made for OUT is followed, even to a new folder
    with output_lock(output_dir):  # first: only a check made under the lock holds while the demo writes
        check_output_folder(output_dir, overwrite=overwrite)
        created = not output_dir.exists()
        try:
            return _run_demo(output_dir, max_steps, max_heldout, overwrite, base)
        except BaseException:
            if created and output_dir.is_dir() and not any(output_dir.iterdir()):
                output_dir.rmdir()  # a demo that wrote nothing leaves no folder either
            raise


def _run_demo(output_dir: Path, max_steps: int | None, max_heldout: int, overwrite: bool,
              base: str | Path | None) -> DemoResult:
    """`run_demo` while it holds the output folder's lock."""
    from .files import apply_umask, staged_folder

    untrained = output_dir / "untrained"
    if base is None:
        with staged_folder(untrained) as staging:  # replaces the demo's own earlier folder (overwrite, checked above)
            save_sentence_transformer(build_default_model(), load_dream_tokenizer(), staging, max_seq_length=128)
        settings = DEMO_TRAINING
    else:  # first: a base that cannot be used leaves nothing behind in OUT (its data/ included)
        used = prepare_base(base, untrained, overwrite=overwrite)
        if used.resolve() != untrained.resolve() and untrained.exists():  # an earlier run's (overwrite, checked)
            shutil.rmtree(untrained)
        untrained, settings = used, BASE_TRAINING
    train_file, heldout_file = write_task(output_dir / "data", max_eval=max_heldout)
    steps = max_steps or settings["max_steps"]
    config = TrainingConfig(**{**settings, "max_steps": steps, "logging_steps": max(1, min(50, steps // 4))})
    heldout = load_training_data(str(heldout_file), default_prompt=config.query_prompt).train
    bm25 = evaluate_bm25(heldout)
    start = time.perf_counter()
    result = train(str(untrained), str(train_file), output_dir / "model", config, eval_data=str(heldout_file),
                   overwrite=overwrite, device="cpu")
    seconds = time.perf_counter() - start

    texts = heldout["anchor"][:2] + heldout["positive"][:2]
    saved_length = json.loads((result.output_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    loaded = embed_as_hub_user(result.output_dir, texts, max_length=saved_length)
    embeddings, st_embeddings = loaded.auto_model, loaded.sentence_transformer
    logger.info("Reloaded with AutoModel and SentenceTransformer (trust_remote_code) in a fresh process; "
                "class from %s", loaded.module)
    model = DiffEmbedForEmbedding.from_pretrained(result.output_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    if not torch.allclose(embeddings, encode(model, tokenizer, texts, max_length=saved_length), atol=1e-5):
        raise RuntimeError("The reloaded model embeds differently from the one that was saved.")
    if not torch.allclose(st_embeddings, embeddings, atol=1e-5):
        raise RuntimeError("SentenceTransformer and AutoModel embed the saved folder differently.")
    metrics = {"untrained": result.metrics_before, "fine-tuned": result.metrics_after, "BM25": bm25}
    apply_umask(train_file.parent)  # untrained/ and model/ already have them (published by staged_folder)
    return DemoResult(result.output_dir, metrics, result.rows, len(heldout), seconds, result.losses, result.steps)
