"""Contrastive fine-tuning with the DiffEmbed recipe, on sentence-transformers' trainer and PEFT.

Defaults are the DiffEmbed study's: LoRA r=16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down; InfoNCE over
cosine x 50 with in-batch and hard negatives, gathered across ranks under torchrun / accelerate; lr 1e-4 with
100 warm-up steps (capped at a tenth of a shorter run); on CUDA gradient checkpointing, bf16 and 4096 tokens. On a
CPU the length, checkpointing, precision, the layers LoRA trains and threads left to "auto" are chosen to fit it
(`device_settings`), and the log says what was chosen and why. The output folder only ever holds a
finished model: checkpoints live beside it (`.<name>.checkpoints`, for `resume=True`) and are removed on success.
A checkpoint counts as complete only once the trainer has finished writing it (a marker file is written last), so
a run killed in the middle of a save resumes from the checkpoint before. The checkpoints folder also records what
the run is (base model identity, training rows digest, every setting): a resume that differs is refused, naming
the difference, so that the finished model's record describes the run that happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import TrainerCallback

from . import register_auto_classes
from .model_folder import ModelFolder, as_model_folder, base_reference, model_identity, read_json
from .torchrun import torchrun_ranks
from .training_data import ColumnMapping, load_training_data
from .encoding import backbone, load_encoder, set_backbone
from .errors import ConfigError, NonFiniteLossError, OutputExistsError, SettingError, TrainingError
from .heldout import evaluate_model
from .outputs import check_output_folder, output_lock, staged_folder, write_json
from .model_card import write_model_card
from .records import HeldoutEvaluation, TrainingRecord, TrainingRun
from .device_settings import apply_threads, plan_training, resolve_device_settings
from .validation import MAX_SEQ_LENGTH, check_max_seq_length, is_non_negative_int, is_positive_int
from .sentence_transformer import (DEFAULT_QUERY_PROMPT, default_prompts, instruction_prompt,
                                   write_sentence_transformer_files)

try:  # sentence-transformers >= 6 moved these; 5.x has them only here
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers, MultiDatasetBatchSamplers
except ImportError:
    from sentence_transformers.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.training_args import BatchSamplers, MultiDatasetBatchSamplers

logger = logging.getLogger(__name__)
register_auto_classes()

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_COMPLETE = "diffembed_checkpoint_complete"  # written into a checkpoint folder once it is whole
RUN_RECORD = "diffembed_run.json"  # in the checkpoints folder: what the run is, for --resume to compare
# the learning-rate schedules after warm-up, by transformers' names (constant: "constant_with_warmup")
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class TrainingConfig:
    """Hyper-parameters; the defaults are the study's recipe. Load overrides with `TrainingConfig.from_file`."""

    max_steps: int = 1000
    batch_size: int = 4  # per device; the study used 4 per GPU x 4 GPUs
    learning_rate: float = 1e-4
    lr_scheduler: str = "linear"  # after warm-up: "linear" decay to 0, "cosine", or "constant"
    warmup_steps: int | None = None  # None: the recipe's 100, capped at WARMUP_CAP of the run (or warmup_ratio)
    warmup_ratio: float | None = None  # warm-up as a share of max_steps (instead of warmup_steps)
    scale: float = 50.0  # cosine x 50, i.e. temperature 0.02
    max_seq_length: int | None = None  # None: the recipe's 4096 on CUDA; on a CPU the training texts' own length
    saved_max_seq_length: int | None = None  # the saved model's limit; None: the base model's
    lora: bool = True  # False: full fine-tuning (sensible only for small or randomly initialised models)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # LoRA on the last N layers only (None: all): the backward pass then stops N layers down, so a step costs the
    # forward pass plus N layers' backward instead of every layer's
    lora_layers: int | None = None
    gradient_checkpointing: bool | None = None  # None: on CUDA (the recipe), off on a CPU where memory allows
    bf16: bool | None = None  # None: on CUDA (the recipe), fp32 on a CPU
    gradcache_mini_batch_size: int | None = None  # set: GradCache, large batches at the memory of this many
    group_by_instruction: bool = False  # every batch from one instruction, as the study batched
    eval_fraction: float = 0.1
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 42
    adapter_only: bool = False  # save only the LoRA adapter instead of the merged model
    query_prompt: str = DEFAULT_QUERY_PROMPT
    # Matryoshka: the loss is also taken on these leading dimensions (sentence-transformers' MatryoshkaLoss), so
    # that truncated vectors keep their quality; "auto" = the width, halved down to 64
    matryoshka_dims: list[int] | str | None = None
    truncate_dim: int | None = None  # stored in config_sentence_transformers.json: SentenceTransformer's default

    def __post_init__(self):
        """Every number in its range, named by its field (the CLI names the flag): nothing is reinterpreted."""
        optional = {"max_seq_length", "saved_max_seq_length", "lora_layers", "gradcache_mini_batch_size",
                    "truncate_dim"}  # None: automatic, or not used
        for name in ("max_steps", "batch_size", "max_seq_length", "saved_max_seq_length", "save_steps",
                     "save_total_limit", "logging_steps", "lora_r", *optional):
            value = getattr(self, name)
            if not (value is None and name in optional) and not is_positive_int(value):
                raise SettingError(name, f"must be an integer >= 1, got {value!r}")
        for name in ("gradient_checkpointing", "bf16"):
            if getattr(self, name) not in (None, True, False):
                raise SettingError(name, f"must be true, false or null (automatic), got {getattr(self, name)!r}")
        if self.warmup_steps is not None and not is_non_negative_int(self.warmup_steps):
            raise SettingError("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("warmup_ratio", "eval_fraction", "lora_dropout"):
            value = getattr(self, name)
            if not (value is None and name == "warmup_ratio") and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
                raise SettingError(name, f"must be a number in [0, 1), got {value!r}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise SettingError("warmup_ratio", "and {warmup_steps} were both given: give one", ("warmup_steps",))
        for name in ("learning_rate", "scale", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise SettingError(name, f"must be a number > 0, got {value!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SettingError("lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.matryoshka_dims is not None and self.matryoshka_dims != "auto":
            from .compact import parse_dims

            try:
                self.matryoshka_dims = parse_dims(self.matryoshka_dims)
            except ValueError as err:
                raise SettingError("matryoshka_dims", f"is not a list of dimensions: {err}") from None
        if self.truncate_dim is not None and self.adapter_only:  # it would be silently dropped
            raise SettingError("truncate_dim", "is stored in a full model's sentence-transformers files, which "
                               "{adapter_only} does not write: train a full model, or give the truncation when "
                               "encoding with the adapter", ("adapter_only",))

    def resolve_dims(self, width: int) -> None:
        """Check the dimensions against the model's width (and pick them for "auto"), before any training."""
        if self.matryoshka_dims == "auto":
            self.matryoshka_dims = auto_matryoshka_dims(width)
        too_wide = [d for d in self.matryoshka_dims or [] if d > width]
        if too_wide:
            raise SettingError("matryoshka_dims", f"{too_wide[0]} is larger than the model's embedding dimension "
                               f"{width}")
        if self.truncate_dim is not None and self.truncate_dim > width:
            raise SettingError("truncate_dim", f"{self.truncate_dim} is larger than the model's embedding dimension "
                               f"{width}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainingConfig:
        """Read a JSON file of field values; unknown keys are an error, not silently ignored. `overrides` (the
        command line's flags) win over the file; a warm-up given either way replaces the file's other form."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"training settings file {path}: no such file") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"training settings file {path}: not a JSON file ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"training settings file {path}: expected a JSON object of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown training settings {unknown}; known: {sorted(known)}")
        warmup = {"warmup_steps", "warmup_ratio"}
        if warmup & set(overrides):  # a warm-up flag replaces the file's warm-up, in whichever form it is given
            values = {name: value for name, value in values.items() if name not in warmup}
        return cls(**{**values, **overrides})


@dataclass
class TrainingResult:
    output_dir: Path
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float] | None
    losses: list[float]
    seconds: float
    steps: int = 0  # optimizer steps that ran (with a resumed run's earlier ones)
    resumed_from: str | None = None  # the checkpoint a resumed run started from
    rows: int = 0  # training rows (after any held-out split)


RECIPE_WARMUP_STEPS = 100
WARMUP_CAP = 0.1  # automatic warm-up: at most this share of the run


def resolve_warmup(config: TrainingConfig) -> int:
    """Warm-up steps: --warmup-ratio of the run, --warmup-steps as given, else the recipe's 100 capped at a tenth
    of the run. Only --warmup-steps may cover the whole run: automatic and ratio warm-ups end before the last step,
    so that the run trains at its learning rate (a 1-step run has none). Warns, saying what will happen, when
    warm-up covers most of the run (`lr_factor`: warm-up step k of W trains at k/(W+1) of the rate)."""
    total, rate = config.max_steps, config.learning_rate
    if config.warmup_ratio is not None:
        steps = min(math.ceil(config.warmup_ratio * total), total - 1)
        option, given = "--warmup-ratio", f"--warmup-ratio {config.warmup_ratio:g}"
    elif config.warmup_steps is not None:
        steps, option = config.warmup_steps, "--warmup-steps"
        given = f"--warmup-steps {steps}"
    else:
        steps = min(RECIPE_WARMUP_STEPS, math.ceil(WARMUP_CAP * total), total - 1)
        option, given = "--warmup-steps", "automatic"
    if steps >= total:
        logger.warning("Warm-up (%s) is longer than the run's %d steps: every step trains below the learning rate "
                       "%g, from %.3g at step 1 to %.3g at step %d, and never reaches it; give --warmup-steps below "
                       "%d for the run to reach it.", given, total, rate, rate / (steps + 1),
                       rate * total / (steps + 1), total, total)
    elif steps > total / 2:  # most of the run
        logger.warning("Warm-up takes %d of the %d steps (%s): the learning rate rises from %.3g at step 1 and "
                       "reaches %g only at step %d%s; lower %s for more of the run at that rate.", steps, total,
                       given, rate / (steps + 1), rate, steps + 1, ", the last" if steps + 1 == total else "",
                       option)
    return steps


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The share of the learning rate that optimizer step `step` (0-based) trains at. transformers' warm-up gives
    step/warmup, so its first step trains at 0 (a 1-step run with 1 warm-up step learns nothing); here warm-up step
    k (1-based) trains at k/(warmup+1), and the full rate comes at step warmup+1, as in transformers. After
    warm-up: transformers' linear decay (to 1/(total-warmup) at the last step, never 0), cosine, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def resolve_logging_steps(config: TrainingConfig) -> int:
    """Log the loss often enough that a short run records some: at least 8 times a run, at most every
    `logging_steps`."""
    return max(1, min(config.logging_steps, config.max_steps // 8))


def _training_texts(dataset, limit: int = 2000) -> list[str]:
    """Up to `limit` of the texts the model encodes in training (anchors with their prompt, documents), for the
    length the device settings choose."""
    parts = list(dataset.values()) if isinstance(dataset, dict) else [dataset]
    texts = [text for part in parts for column in part.column_names for text in part[column]]
    step = max(1, len(texts) // limit)
    return texts[::step][:limit]


def _resolve_settings(config: TrainingConfig, model: SentenceTransformer, data_split,
                      limit: int | None) -> tuple[TrainingConfig, dict]:
    """The run's concrete settings: the device's (`device_settings`), the saved model's length (the base's unless
    asked) and its query prompt (the training instruction, where every row has the same one). Logged once."""
    settings = resolve_device_settings(config, model.device, backbone(model).config, model.tokenizer,
                                       _training_texts(data_split.train), config.batch_size * texts_per_row(data_split),
                                       limit)
    apply_threads(settings)
    logger.info("%s.", settings.describe())
    base_length = model.max_seq_length or min(limit or MAX_SEQ_LENGTH, MAX_SEQ_LENGTH)
    saved = config.saved_max_seq_length or base_length
    logger.info("The saved model will carry max_seq_length %d (%s); training cuts inputs at %d tokens.", saved,
                "as set" if config.saved_max_seq_length else "the base model's", settings.max_seq_length)
    query_prompt = config.query_prompt
    if len(data_split.instructions) == 1 and data_split.instructions[0]:
        query_prompt = instruction_prompt(data_split.instructions[0])
        logger.info("The saved model's query prompt is the training instruction: %r.", query_prompt)
    elif len(data_split.instructions) > 1:
        logger.warning("The training rows carry %d different instructions; the saved query prompt stays %r: give "
                       "each task's instruction when encoding.", len(data_split.instructions), query_prompt)
    resolved = dataclasses.replace(config, max_seq_length=settings.max_seq_length, saved_max_seq_length=saved,
                                   gradient_checkpointing=settings.gradient_checkpointing, bf16=settings.bf16,
                                   lora_layers=settings.lora_layers, query_prompt=query_prompt)
    record = {"device": settings.device, "threads": settings.threads, "reasons": settings.reasons}
    return resolved, record


# PEFT reads `is_gradient_checkpointing`, which transformers 5 deprecated: a FutureWarning the user can do nothing
# about, printed at every adapter load; silenced around those calls only.
QUIET_FUTURE_WARNING = r".*is_gradient_checkpointing.*deprecated"


def _add_lora(model: SentenceTransformer, config: TrainingConfig) -> None:
    """Wrap the backbone with PEFT's LoRA (PEFT's own API: transformers' add_adapter demands peft >= 0.22)."""
    from peft import LoraConfig, get_peft_model

    layers = backbone(model).config.num_hidden_layers
    if config.lora_layers is not None and config.lora_layers > layers:
        raise SettingError("lora_layers", f"is {config.lora_layers}, but the model has {layers} layers")
    last = None if config.lora_layers is None else list(range(layers - config.lora_layers, layers))
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none", layers_to_transform=last,
                      layers_pattern=None if last is None else "layers")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET_FUTURE_WARNING, category=FutureWarning)
        set_backbone(model, get_peft_model(backbone(model), lora))


class _Trainer(SentenceTransformerTrainer):
    """Resumes LoRA runs: a checkpoint then holds only the adapter, which sentence-transformers cannot reload
    as a model, so the adapter weights are put back into the model in training directly; collects no model card
    data (the card is ours); schedules the learning rate with `lr_factor`, so that every step trains."""

    def __init__(self, *args, lr_schedule: str = "linear", **kwargs):
        self.lr_schedule = lr_schedule  # a key of LR_SCHEDULERS
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """`lr_factor` in place of transformers' schedules, whose warm-up runs the first step at rate 0."""
        if self.lr_scheduler is None:
            factor = functools.partial(lr_factor, warmup=self.args.get_warmup_steps(num_training_steps),
                                       total=num_training_steps, schedule=self.lr_schedule)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True  # transformers resets it between calls to train() by this flag
        return self.lr_scheduler

    def add_model_card_callback(self, default_args_dict) -> None:
        """None: `train` writes its own model card (model_card.py). sentence-transformers' card data would
        compute widget examples over the training rows at start-up, behind a progress bar of its own."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        inner = backbone(self.model)
        if not isinstance(inner, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint)
        set_peft_model_state_dict(inner, load_file(str(Path(resume_from_checkpoint) / "adapter_model.safetensors")))


MATRYOSHKA_MIN_DIM = 64


def auto_matryoshka_dims(width: int) -> list[int]:
    """The width, then halved while at least 64 remain: 3584 -> 3584, 1792, 896, 448, 224, 112."""
    dims = [width]
    while dims[-1] // 2 >= MATRYOSHKA_MIN_DIM:
        dims.append(dims[-1] // 2)
    return dims


def _make_loss(model: SentenceTransformer, config: TrainingConfig) -> torch.nn.Module:
    # gather_across_devices: under torchrun every rank scores its queries against every rank's documents (in one
    # process there is nothing to gather, and sentence-transformers would warn that it cannot).
    gather = torchrun_ranks().world_size > 1
    if config.gradcache_mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(model, scale=config.scale, gather_across_devices=gather,
                                                  mini_batch_size=config.gradcache_mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=config.scale, gather_across_devices=gather)
    if config.matryoshka_dims:  # the same loss on each leading slice, equally weighted (GradCache included)
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=list(config.matryoshka_dims))
    return loss


def _stop_on_non_finite_loss(loss: torch.nn.Module, trainer: SentenceTransformerTrainer) -> None:
    """A NaN/inf loss ends training with a clear error before any broken model can be written."""

    def check(module, inputs, output):
        if not torch.isfinite(output.detach()).all():
            raise FloatingPointError(f"The training loss became {output.item()}.")

    loss.register_forward_hook(check)


class _MarkCompleteCheckpoints(TrainerCallback):
    """Writes the completion marker into a checkpoint folder after the trainer has finished saving it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / CHECKPOINT_COMPLETE).write_text(f"{state.global_step}\n", encoding="utf-8")
        return control


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found)


def _last_complete_checkpoint(folder: Path, remove_incomplete: bool = False) -> Path | None:
    """The checkpoint with the highest step that was completely written; incomplete ones (a save that was killed)
    are never used, and removed when `remove_incomplete` (so that the trainer cannot count or rotate them)."""
    last = None
    for step, path in _checkpoints(folder):
        if (path / CHECKPOINT_COMPLETE).is_file():
            last = path
        elif remove_incomplete:
            logger.warning("Removing %s: its save did not finish (the run was interrupted while saving).", path)
            shutil.rmtree(path, ignore_errors=True)
    return last


def _merge_adapter(model: SentenceTransformer, source: str | ModelFolder, revision: str | None,
                   config: TrainingConfig, device: str | None, trust_remote_code: bool):
    """Merge the trained LoRA weights into a fresh copy of the base model (PEFT's merge_and_unload): the one it
    was trained on (`source`: the folder opened for the run, or a Hub id at its `revision`)."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as adapter_dir:
        backbone(model).save_pretrained(adapter_dir)  # the adapter alone
        merged = load_encoder(source, device=device, trust_remote_code=trust_remote_code,
                              max_seq_length=config.saved_max_seq_length,
                              **({"revision": revision} if revision else {}))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=QUIET_FUTURE_WARNING, category=FutureWarning)
            set_backbone(merged, PeftModel.from_pretrained(backbone(merged), adapter_dir).merge_and_unload())
    return merged


def _write_output(model: SentenceTransformer, output_dir: Path, config: TrainingConfig, record: TrainingRecord,
                  base: tuple[str, str | None], overwrite: bool) -> None:
    """Write the finished model (with its model card) and publish it whole; an existing `output_dir`
    (overwrite=True) is replaced only then. An adapter names its `base` (`checkpoint.base_reference`) as PEFT
    would not: by absolute path or Hub id and commit, never as typed (a relative path would load whatever folder
    of that name the working directory holds when it is used)."""
    if config.adapter_only:
        peft_config = backbone(model).peft_config["default"]
        peft_config.base_model_name_or_path, peft_config.revision = base
    with staged_folder(output_dir, replace=overwrite) as staging:
        backbone(model).save_pretrained(staging)  # the merged model, or the adapter alone
        model.tokenizer.save_pretrained(staging)
        if not config.adapter_only:
            prompts = {**default_prompts(), "query": config.query_prompt}
            write_sentence_transformer_files(staging, max_seq_length=config.saved_max_seq_length, prompts=prompts,
                                             truncate_dim=config.truncate_dim)
        write_json(staging / TrainingRecord.FILE, record.to_dict())
        write_model_card(staging, repo_id=output_dir.name)  # the folder's final name, not the staging one


def build_trainer(model: SentenceTransformer, train_dataset, config: TrainingConfig, checkpoints: str | Path,
                  callbacks: list | None = None) -> SentenceTransformerTrainer:
    """The recipe's trainer around `model` (LoRA added when configured, the InfoNCE loss, bf16 and gradient
    checkpointing on CUDA, checkpoints marked complete only once written). `train` runs it;
    benchmarks/train_throughput.py times it."""
    if config.lora:
        torch.manual_seed(config.seed)  # LoRA's A matrices start random: seeded, a rerun or resume is the same run
        _add_lora(model, config)
    loss = _make_loss(model, config)
    on_cuda = model.device.type == "cuda"
    checkpointing = on_cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    distributed = torchrun_ranks().world_size > 1
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=resolve_warmup(config),
        lr_scheduler_type=LR_SCHEDULERS[config.lr_scheduler],
        **_checkpointing_arguments(checkpointing),
        bf16=on_cuda if config.bf16 is None else config.bf16,
        use_cpu=not on_cuda,
        ddp_backend="gloo" if distributed and not on_cuda else None,  # torchrun on CPUs
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=resolve_logging_steps(config),
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate in the batch would be a false negative
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,  # one instruction per batch
        dataloader_drop_last=True,
    )
    if not hasattr(args, "save_safetensors"):  # transformers 5 removed it; sentence-transformers 5.2 saves with it
        args.save_safetensors = True
    trainer = _Trainer(model=model, args=args, train_dataset=train_dataset, loss=loss,
                       callbacks=[_MarkCompleteCheckpoints(), *(callbacks or [])], lr_schedule=config.lr_scheduler)
    _stop_on_non_finite_loss(loss, trainer)
    return trainer


def train(
    model_name_or_path: str,
    data: str,
    output_dir: str | Path,
    config: TrainingConfig | None = None,
    *,
    mapping: ColumnMapping | None = None,
    eval_data: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str | None = None,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
    device_memory: int | str | None = None,
) -> TrainingResult:
    """Fine-tune `model_name_or_path` (a DiffEmbed folder or Hub id) on `data` and write a Hub-ready folder.

    Data problems are reported before anything is written. Evaluation on the held-out rows (`eval_data`, or an
    `eval_fraction` of `data`) runs before and after training; its table goes into `diffembed_training.json`,
    which the model card reads. `trust_remote_code` lets a base folder's own Python code (a custom tokenizer)
    run; DiffEmbed's classes always come from this package. Before the weights load, settings whose estimated peak
    memory (`memory_estimate`) exceeds the device's (or `device_memory`, bytes or e.g. "80GiB") are refused with
    `MemoryLimitError`, naming the settings that would fit.
    """
    config = config or TrainingConfig()
    output_dir = Path(output_dir)
    ranks = torchrun_ranks()  # a stray RANK or WORLD_SIZE (no torchrun) is refused before any work, naming it
    # one run per output: a second `train` into the same OUT (or its checkpoints) is refused, naming this one;
    # taken first, so that the check below still holds when the model is published
    lock = output_lock(output_dir) if ranks.is_main else contextlib.nullcontext()
    with lock:
        # --resume never licenses replacing a folder: the output is only ever written at the end of a run.
        check_output_folder(output_dir, overwrite=overwrite)
        # the run sets torch's thread count for itself (device_settings, CPU); the caller's comes back afterwards,
        # returned or raised, since a library call must not change its process (the CLI's or a notebook's)
        threads = torch.get_num_threads()
        try:
            return _run(model_name_or_path, data, output_dir, config, mapping=mapping, eval_data=eval_data,
                        overwrite=overwrite, resume=resume, device=device, callbacks=callbacks,
                        trust_remote_code=trust_remote_code, device_memory=device_memory)
        finally:
            torch.set_num_threads(threads)


def _run(model_name_or_path: str, data: str, output_dir: Path, config: TrainingConfig, *, mapping, eval_data,
         overwrite: bool, resume: bool, device: str | None, callbacks: list | None,
         trust_remote_code: bool, device_memory: int | str | None) -> TrainingResult:
    data_split = load_training_data(
        data, mapping=mapping, eval_source=eval_data, eval_fraction=0.0 if eval_data else config.eval_fraction,
        group_by_instruction=config.group_by_instruction, default_prompt=config.query_prompt, seed=config.seed,
    )
    rows = sum(map(len, data_split.train.values())) if isinstance(data_split.train, dict) else len(data_split.train)
    logger.info("Training rows: %d (negatives per row: %d); held-out rows: %d", rows, data_split.negatives_per_row,
                0 if data_split.eval is None else len(data_split.eval))
    world = torchrun_ranks().world_size
    if rows < config.batch_size * world:
        raise TrainingError(f"{data}: {rows} training rows, fewer than one batch of {config.batch_size * world} "
                            "(--batch-size per device x devices); lower --batch-size or add rows")
    checkpoints = output_dir.parent / f".{output_dir.name}.checkpoints"
    resume_from = _resume_point(checkpoints, resume, overwrite)
    # a local base is read and checked once, here, and handed to the memory check, the loader and the record
    source = as_model_folder(model_name_or_path, trust_remote_code=trust_remote_code) or model_name_or_path
    _check_memory(source, config, data_split, device, world, device_memory)
    start = time.perf_counter()
    # a base whose stored length exceeds its positions is refused at load, unless the saved length is given
    model = load_encoder(source, device=device, trust_remote_code=trust_remote_code,
                         max_seq_length=config.saved_max_seq_length)
    base = base_reference(getattr(source, "path", source), getattr(backbone(model).config, "_commit_hash", None))
    limit = getattr(backbone(model).config, "max_position_embeddings", None)
    check_max_seq_length(config.max_seq_length, limit)
    check_max_seq_length(config.saved_max_seq_length, limit, name="saved_max_seq_length")
    config.resolve_dims(backbone(model).config.hidden_size)
    config, settings_record = _resolve_settings(config, model, data_split, limit)
    record = _run_record(source, model, [data] + ([eval_data] if eval_data else []), data_split, config,
                         world)
    if resume_from is not None:
        _check_resume(checkpoints, record)
    model.max_seq_length = config.max_seq_length
    before = evaluate_model(model, data_split.eval, config.batch_size * 8) if data_split.eval else None
    trainer = build_trainer(model, data_split.train, config, checkpoints, callbacks=callbacks)
    steps, losses = _fit(trainer, checkpoints, record, resume_from,
                         batch=f"{config.batch_size} from the {rows} rows of {data}")
    if steps < config.max_steps:
        logger.warning("Training ended after %d of %d steps: the data gave no further batch.", steps, config.max_steps)

    if config.lora and not config.adapter_only:
        model = _merge_adapter(model, source if isinstance(source, ModelFolder) else base[0], base[1], config,
                               device, trust_remote_code)
        model.max_seq_length = config.max_seq_length  # evaluated as before training: at the training length
    after = evaluate_model(model, data_split.eval, config.batch_size * 8) if data_split.eval else None
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():
        trained = _training_record(trainer, config, base, data, eval_data, settings_record, resume_from, world,
                                   losses, before, after, seconds)
        _write_output(model, output_dir, config, trained, base, overwrite)
        shutil.rmtree(checkpoints, ignore_errors=True)
    logger.info("Fine-tuned model written to %s in %.0f s", output_dir, seconds)
    return TrainingResult(output_dir, before, after, losses, seconds, steps, str(resume_from) if resume_from else None,
                          rows)


def _resume_point(checkpoints: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint a run continues from (`resume`), or None; an interrupted run's checkpoints are never thrown
    away unasked (`overwrite` deletes them)."""
    if resume:
        resume_from = _last_complete_checkpoint(checkpoints, remove_incomplete=torchrun_ranks().is_main)
        if resume_from is None:
            logger.warning("--resume: no complete checkpoint in %s; training from the start.", checkpoints)
        else:
            logger.warning("Resuming from %s (the last complete checkpoint).", resume_from)
        return resume_from
    if _checkpoints(checkpoints):
        if not overwrite:
            raise OutputExistsError(f"{checkpoints} holds the checkpoints of an interrupted run: pass --resume to "
                                    "continue it, or --overwrite to start again (they are then deleted)")
        shutil.rmtree(checkpoints)
    return None


def _fit(trainer: SentenceTransformerTrainer, checkpoints: Path, record: dict, resume_from: Path | None,
         batch: str) -> tuple[int, list[float]]:
    """Run the trainer (recording a new run for --resume first): (steps, logged losses). A run that stops on a
    non-finite loss, runs no step (`batch`: the batch it could not form) or fails leaves no checkpoint folder
    without a complete checkpoint."""
    try:
        if resume_from is None and torchrun_ranks().is_main:  # a new run: what --resume will compare
            checkpoints.mkdir(parents=True, exist_ok=True)
            write_json(checkpoints / RUN_RECORD, record)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except FloatingPointError as err:  # from the loss check (a non-finite embedding makes the loss so)
        _remove_if_no_complete_checkpoint(checkpoints)
        raise NonFiniteLossError(
            f"Training stopped at step {trainer.state.global_step + 1}: {err} No model was written; lower the "
            "learning rate, or train in bf16/fp32 rather than fp16."
        ) from err
    except BaseException:
        _remove_if_no_complete_checkpoint(checkpoints)
        raise
    steps = trainer.state.global_step
    if steps == 0:
        _remove_if_no_complete_checkpoint(checkpoints)
        raise TrainingError(
            f"Training ran no step: the batch sampler, which never puts the same text twice in a batch (a duplicate "
            f"would be a false negative), formed no batch of {batch}; are most rows duplicates? No model was "
            "written.")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses and not math.isfinite(losses[-1]):
        raise NonFiniteLossError(f"The training loss ended as {losses[-1]}; no model was written.")
    return steps, losses


def _training_record(trainer: SentenceTransformerTrainer, config: TrainingConfig, base: tuple[str, str | None],
                     data: str, eval_data: str | None, settings_record: dict, resume_from: Path | None, world: int,
                     losses: list[float], before: dict | None, after: dict | None, seconds: float) -> TrainingRecord:
    """What the finished run writes beside the model (`diffembed_training.json`) and the card reads."""
    steps = trainer.state.global_step
    return TrainingRecord(
        base_model=base[0], base_model_revision=base[1],
        datasets=[data] + ([eval_data] if eval_data else []),
        hyperparameters=dataclasses.asdict(config),
        training=TrainingRun(
            steps=steps, epochs=round(trainer.state.epoch or 0.0, 4),
            samples=steps * config.batch_size * world, devices=world,
            first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
            losses=[{"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
                    for entry in trainer.state.log_history if "loss" in entry],
            peak_learning_rate=max((entry.get("learning_rate") or 0.0 for entry in trainer.state.log_history),
                                   default=None),
            warmup_steps=trainer.args.warmup_steps, device_settings=settings_record,
            resumed_from_step=int(resume_from.name.split("-")[-1]) if resume_from else None,
        ),
        evaluation=None if after is None else HeldoutEvaluation(
            split=eval_data or f"held-out {config.eval_fraction:.0%} of {data}",
            max_seq_length=config.max_seq_length, metrics=after, metrics_before_training=before,
        ),
        training_time_seconds=round(seconds, 1),
    )


def texts_per_row(data_split) -> int:
    """The texts each training row gives the model (query, positive, negatives): one forward pass each per step."""
    columns = data_split.train.column_names
    return len(next(iter(columns.values())) if isinstance(columns, dict) else columns)


def training_memory(model_name_or_path: str | ModelFolder, config: TrainingConfig, per_row: int, device: str | None,
                    world: int, device_memory: int | str | None, *, favourable: bool = False):
    """(the training estimate, the memory it is compared with, where that figure comes from), from config.json."""
    from .outputs import parse_size
    from .memory_estimate import ModelShape, device_memory as memory_of, read_model_config, resolve_device

    device = resolve_device(device)
    memory, source = memory_of(device, None if device_memory is None else parse_size(device_memory))
    shape = ModelShape.from_config(read_model_config(model_name_or_path))
    estimate = plan_training(shape, config, texts_per_row=per_row, device=device, world_size=world, memory=memory,
                             favourable=favourable)
    return estimate, memory, source


def _check_memory(model_name_or_path: str | ModelFolder, config: TrainingConfig, data_split, device: str | None,
                  world: int, device_memory: int | str | None) -> None:
    """Refuse, before the weights load, settings whose estimated peak exceeds the device's memory. Automatic
    settings are counted at their most favourable (`plan_training(favourable=True)`): only a run that cannot fit
    is refused. A model whose config cannot be read here is left to the loader, which names the problem."""
    from .errors import ModelFilesError, UsageError
    from .memory_estimate import check_training_fits

    try:
        estimate, memory, source = training_memory(model_name_or_path, config, texts_per_row(data_split), device,
                                                   world, device_memory, favourable=True)
    except (ModelFilesError, UsageError) as err:
        if device_memory is not None:
            raise
        logger.debug("No memory estimate before loading: %s", err)
        return
    check_training_fits(estimate, memory, source, when="before loading the weights; automatic settings counted at "
                        "their most favourable")


def _rows_digest(data_split) -> str:
    """sha256 of the rows training and held-out evaluation read (after column mapping, prompts and the split):
    the same rows from a moved or renamed file give the same digest."""
    digest = hashlib.sha256()
    for part, data in (("train", data_split.train), ("eval", data_split.eval)):
        groups = sorted(data.items()) if isinstance(data, dict) else [("", data)] if data is not None else []
        for name, dataset in groups:
            digest.update(f"{part}\x00{name}\x00{len(dataset)}\x00".encode("utf-8"))
            for column in dataset.column_names:
                digest.update(column.encode("utf-8") + b"\x00")
                for value in dataset[column]:
                    data_bytes = str(value).encode("utf-8")
                    digest.update(len(data_bytes).to_bytes(8, "little") + data_bytes)
    return digest.hexdigest()


def _run_record(source: str | ModelFolder, model: SentenceTransformer, sources: list[str], data_split,
                config: TrainingConfig, world: int) -> dict:
    """What the run is: the base's identity, the rows' digest, every setting (as resolved) and the devices."""
    identity = source.identity if isinstance(source, ModelFolder) else model_identity(
        source, getattr(backbone(model).config, "_commit_hash", None))
    return {"base_model": {**identity.as_dict(), "key": identity.key},
            "data": {"sources": sources, "sha256": _rows_digest(data_split)},
            "settings": json.loads(json.dumps(dataclasses.asdict(config))), "devices": world}


def _check_resume(checkpoints: Path, record: dict) -> None:
    """Refuse to resume the checkpoints of another run (another base, other rows, any other setting): the
    trainer would restore the checkpoint's optimizer and schedule, or merge its adapter into another base, and the
    finished model's record would describe a run that did not happen. Names every difference."""
    path = checkpoints / RUN_RECORD
    if not path.is_file():
        logger.warning("--resume: %s has no record of its run (made by an earlier version), so nothing checks that "
                       "this run's base, data and settings are the interrupted run's; they must be.", checkpoints)
        return
    before = read_json(path, TrainingError)
    differences = []
    then, now = before.get("base_model") or {}, record["base_model"]
    if then.get("key") != now["key"]:
        differences.append(f"the base model was {_describe_base(then)}, now {_describe_base(now)}")
    then, now = before.get("data") or {}, record["data"]
    if then.get("sha256") != now["sha256"]:
        differences.append(f"the training rows were those of {', '.join(then.get('sources') or ['?'])} (sha256 "
                           f"{str(then.get('sha256'))[:12]}), now of {', '.join(now['sources'])} (sha256 "
                           f"{now['sha256'][:12]})")
    then, now = before.get("settings") or {}, record["settings"]
    settings = [name for name in [*now, *(k for k in then if k not in now)] if then.get(name) != now.get(name)]
    differences += [f"{{{name}}} was {then.get(name)!r}, now {now.get(name)!r}" for name in settings]
    if before.get("devices") != record["devices"]:
        differences.append(f"the run had {before.get('devices')} device(s), now {record['devices']}")
    if differences:
        raise SettingError("resume", f"cannot continue the checkpoints in {checkpoints}: they are of another run: "
                           f"{'; '.join(differences)}. Resume with that run's base, data and settings, or start "
                           "again without {resume} and with {overwrite} (which deletes them)",
                           (*settings, "resume", "overwrite"))


def _describe_base(identity: dict) -> str:
    if identity.get("model_sha256"):
        return f"{identity.get('model')} (sha256 {identity['model_sha256'][:12]})"
    return f"{identity.get('model')} at {identity.get('revision') or 'an unknown revision'}"


def _remove_if_no_complete_checkpoint(checkpoints: Path) -> None:
    """A failed run keeps its checkpoints only if one of them can be resumed from (no empty folders left)."""
    if checkpoints.is_dir() and _last_complete_checkpoint(checkpoints) is None:
        shutil.rmtree(checkpoints, ignore_errors=True)


def _checkpointing_arguments(enabled: bool) -> dict:
    """transformers 5.x renamed gradient checkpointing to activation checkpointing: the new names where the
    installed version has them (no FutureWarning), the old ones on versions that know only those."""
    names = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
