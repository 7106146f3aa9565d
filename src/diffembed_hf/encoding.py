"""Encoding texts with a DiffEmbed model: `load_encoder` loads a folder or Hub id as a `SentenceTransformer`
(checked first, never running code the user did not opt into), `encode` embeds through the packed encoder
(`packed_encoder.PackedEncoder`), `save_embeddings` writes a file whole, and `encode_file` is `diffembed encode`'s
file mode.

What this adds to `SentenceTransformer.encode`: no padded token is ever computed (length-sorted packed batches
under a token budget), a clear error for a bad item, one warning saying how many texts were truncated
(sentence-transformers cuts them silently), bf16 weights on CUDA by default, the max length checked against
the model's positions before any work, a LoRA adapter folder embedding exactly as its merged model, and FP8
linear layers (torchao) on GPUs that have FP8 tensor cores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from . import register_auto_classes
from .packed_encoder import (
    DEFAULT_MAX_TOKENS_PER_BATCH,
    PackedEncoder,
    check_texts,
    progress_bar,
    resolve_prompt,
    unknown_prompt,
    warn_truncated,
)
from .model_folder import ModelFolder, as_model_folder, check_model_files
from .compact import (CalibrationRanges, Compaction, CompactError, check_truncate_dim, load_calibration,
                      resolve_precision)
from .errors import DiffembedError, ModelFilesError, UsageError, one_line, require_extra
from .outputs import staged_file
from .validation import (check_choice, check_max_seq_length, check_positive_int, is_positive_int, read_options,
                         with_overrides)

logger = logging.getLogger(__name__)


register_auto_classes()

QUANTIZATIONS = ("fp8",)
OUTPUT_SUFFIXES = (".npy", ".safetensors")


def backbone(model: SentenceTransformer) -> torch.nn.Module:
    """The transformers model inside a SentenceTransformer (`auto_model` in 5.x, `model` in 6.x)."""
    return model[0].auto_model


def set_backbone(model: SentenceTransformer, module: torch.nn.Module) -> None:
    # sentence-transformers 6 made `auto_model` a read-only view of `model`; 5.x stores `auto_model` itself.
    read_only = isinstance(getattr(type(model[0]), "auto_model", None), property)
    setattr(model[0], "model" if read_only else "auto_model", module)


def check_stored_length(name: str, stored: int | None, limit: int | None, where: str) -> None:
    """A folder's stored max_seq_length (sentence_bert_config.json) must fit its positions too: a larger one is
    what every text is cut to, and the first text longer than the positions would fail mid-run, after shards or
    results were written. Checked at load, whatever the entry point, when no length is given."""
    if stored is None or not limit:
        return
    if not is_positive_int(stored):
        raise ModelFilesError(f"{where} stores max_seq_length {stored!r}, not a positive whole number; correct it, "
                              "or pass --max-seq-length (max_seq_length=)")
    if stored > limit:
        raise ModelFilesError(f"{where} stores max_seq_length {stored}, more than {name}'s max_position_embeddings "
                              f"({limit}); give a length of {limit} or less (encode, evaluate: --max-seq-length; "
                              "train: --saved-max-seq-length), or correct the file")


def check_prompt_name(folder: ModelFolder | None, prompt_name: str | None) -> None:
    """Before loading: a prompt name a local model folder does not store is refused (Hub ids, `folder` None,
    are checked on load)."""
    if prompt_name is not None and folder is not None and prompt_name not in folder.prompts:
        raise unknown_prompt(prompt_name, folder.prompts)


def load_encoder(
    model_name_or_path: str | ModelFolder,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    max_seq_length: int | None = None,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    truncate_dim: int | None = None,
    compile: bool = False,
    **kwargs,
) -> SentenceTransformer:
    """Load a DiffEmbed folder or Hub id as a `SentenceTransformer`.

    A local folder (a path, or a `ModelFolder` a job has already opened: `checkpoint.open_model_folder`) is
    checked before anything loads, once: a DiffEmbed model (another architecture is refused, even with its own
    code), no path or link leading out of it, no Python code of its own unless
    `trust_remote_code=True`, and `max_seq_length` within its positions. DiffEmbed's classes come from this
    package, never from the folder. A LoRA adapter folder (`diffembed train --adapter-only`) loads its base and
    merges the adapter, so it embeds exactly as the merged model would.

    Weights default to bfloat16 on CUDA (float16 overflows in Qwen-family models) and float32 elsewhere; the
    model pools and normalises in float32 whatever the weights' dtype. `quantize="fp8"` runs every linear
    layer with dynamic per-row FP8 activations and weights (torchao) and keeps the rest in bfloat16; where
    that cannot run, `QuantizationUnavailable` says why before anything is loaded. `truncate_dim` keeps the first
    dimensions of every vector (a Matryoshka-trained model loses little; `encode` renormalises them); by default the
    one stored in the folder's `config_sentence_transformers.json`, if any. A dimension larger than the model's is
    refused. `compile=True` compiles the model's forward with `torch.compile` (`compile_backbone`).
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; use one of {QUANTIZATIONS} or None")
    folder = as_model_folder(model_name_or_path, trust_remote_code=trust_remote_code)
    if folder is not None and folder.kind == "adapter":
        return _load_adapter(folder, device=device, dtype=dtype, max_seq_length=max_seq_length, quantize=quantize,
                             compile=compile, trust_remote_code=trust_remote_code, truncate_dim=truncate_dim, **kwargs)
    if folder is not None:
        if isinstance(model_name_or_path, ModelFolder):  # a path as given stays as given, in every message
            model_name_or_path = str(folder.path)
        check_max_seq_length(max_seq_length, folder.max_position_embeddings)
        if max_seq_length is None:
            check_stored_length(str(folder), folder.sentence_bert.get("max_seq_length"),
                                folder.max_position_embeddings, str(folder.path / "sentence_bert_config.json"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quantize == "fp8":
        from .fp8 import check_fp8_support

        check_fp8_support(device, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" or quantize else torch.float32
    model_kwargs = {"dtype": dtype, **kwargs.pop("model_kwargs", {})}
    try:
        model = SentenceTransformer(model_name_or_path, device=device, trust_remote_code=trust_remote_code,
                                    model_kwargs=model_kwargs, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever the libraries raise, the user reads one line
        raise _load_failure(model_name_or_path, folder, err) from err
    model_type = getattr(backbone(model).config, "model_type", None)
    if model_type != "diffembed":  # a Hub id: checked once downloaded, before any text is embedded
        raise UsageError(f"{model_name_or_path} is not a DiffEmbed model (model_type {model_type!r}); convert it "
                         "first (diffembed convert)")
    positions = getattr(backbone(model).config, "max_position_embeddings", None)
    if max_seq_length is not None:
        check_max_seq_length(max_seq_length, positions)
        model.max_seq_length = max_seq_length
    else:  # a Hub id's stored length, known only now (a local folder's was checked before loading)
        check_stored_length(model_name_or_path, model.max_seq_length, positions,
                            f"{model_name_or_path} (sentence_bert_config.json)")
    set_truncate_dim(model, folder or model_name_or_path, truncate_dim)
    if quantize == "fp8":
        from .fp8 import quantize_fp8

        quantize_fp8(backbone(model))
    if compile:
        compile_backbone(model)
    return model


def compile_backbone(model: SentenceTransformer) -> None:
    """Compile the transformers model's forward in place (`nn.Module.compile`: same module, same weights and
    state-dict keys) as one graph (`fullgraph=True`: a graph break is an error, not a silent slowdown) with
    dynamic shapes, so that the packed encoder's batches, each a different token count, text count and longest
    text, reuse one graph instead of compiling again per batch. The first batch pays the compilation."""
    backbone(model).compile(fullgraph=True, dynamic=True)
    logger.info("The model's forward is compiled (torch.compile, fullgraph, dynamic shapes) at its first batch")


def embedding_width(model: SentenceTransformer) -> int:
    """The model's full embedding dimension (before any truncation)."""
    return int(model[0].auto_model.config.hidden_size)


def set_truncate_dim(model: SentenceTransformer, source: str | ModelFolder, truncate_dim: int | None) -> None:
    """`model.truncate_dim`: the one asked for, else the folder's stored one (sentence-transformers reads it from
    `config_sentence_transformers.json` since 5.4; read here for older versions), checked against the width."""
    if truncate_dim is None:
        truncate_dim = getattr(model, "truncate_dim", None) or _stored_truncate_dim(source)
    model.truncate_dim = check_truncate_dim(truncate_dim, embedding_width(model))


def _stored_truncate_dim(source: str | ModelFolder) -> int | None:
    if isinstance(source, ModelFolder):  # read when the folder was opened
        return source.sentence_transformers.get("truncate_dim")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config_sentence_transformers.json") if "/" in source else None
    if not isinstance(cached, str):
        return None
    import json

    try:
        return json.loads(Path(cached).read_text(encoding="utf-8")).get("truncate_dim")
    except (OSError, ValueError, AttributeError):
        return None


def _load_failure(name: str, folder: ModelFolder | None, err: Exception) -> DiffembedError:
    """One clear error for a model that did not load: for a local folder, the damaged file when one can be
    named (transformers reports a bad tokenizer as "Unrecognized processing class", after loading the weights);
    else what the library said, on one line (a Hub id out of reach, a folder needing its own code)."""
    if folder is not None:
        check_model_files(folder.path, deep=True)  # raises ModelFilesError naming the file at fault
    if isinstance(err, ValueError) and "trust_remote_code" in str(err):
        return UsageError(f"{name} needs its own code to load; read it, then pass --trust-remote-code "
                          "(trust_remote_code=True)")
    reason = str(err) if isinstance(err, (OSError, ValueError)) and str(err) else one_line(err)
    return DiffembedError(f"cannot load the model {name!r}: {' '.join(reason.split())}")


def _load_adapter(folder: ModelFolder, **options) -> SentenceTransformer:
    """A LoRA adapter folder as the merged model: its base (a DiffEmbed folder or Hub id), the adapter applied
    and merged with PEFT, so its vectors are the merged model's (pooling and normalisation included)."""
    if options.get("quantize"):
        raise UsageError("quantize= applies to a full model: merge the adapter first")
    require_extra("train", ("peft",), what=f"embedding with the LoRA adapter folder {folder}")
    from peft import PeftModel

    base, revision = folder.base  # the base `checkpoint.model_identity` covers
    if revision is not None:
        options["revision"] = revision
    compile = options.pop("compile", False)  # the merged model is the one to compile
    try:
        model = load_encoder(base, **options)
    except UsageError as err:
        raise UsageError(f"{folder} is a LoRA adapter whose base {base!r} cannot be loaded: {err}") from None
    set_backbone(model, PeftModel.from_pretrained(backbone(model), str(folder.path)).merge_and_unload())
    if compile:
        compile_backbone(model)
    logger.info("Loaded the LoRA adapter %s merged into its base %s", folder, base)
    return model


def encode(
    model: SentenceTransformer,
    texts: str | Sequence[str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    batch_size: int | None = None,
    convert_to_tensor: bool = False,
    show_progress_bar: bool | None = None,
    precision: str = "float32",
    calibration: CalibrationRanges | None = None,
) -> np.ndarray | torch.Tensor:
    """Embed `texts` (float32, L2-normalised by the model's Normalize module); one row per text.

    Batches hold up to `max_tokens_per_batch` real tokens (and at most `batch_size` texts, if given). An empty
    list gives a `(0, dim)` result. Texts longer than `model.max_seq_length` tokens (prompt included) are
    truncated, with one warning per call that says how many. With `model.truncate_dim` set (`load_encoder`)
    rows keep that many dimensions, renormalised. `precision` float16, int8, uint8, binary or ubinary returns
    sentence-transformers' `quantize_embeddings` codes (int8/uint8 with the corpus's `calibration` ranges,
    `compact.load_calibration`; check they are this model's with `CalibrationRanges.check`).
    """
    single = isinstance(texts, str)
    texts = check_texts(texts)
    compaction = Compaction(getattr(model, "truncate_dim", None), precision, calibration)
    compaction.check(embedding_width(model), calibration.model if calibration is not None else None)
    if convert_to_tensor and precision != "float32":
        raise CompactError(f"precision={precision!r} returns numpy codes; leave convert_to_tensor off")
    encoder = PackedEncoder(model, prompt=resolve_prompt(model, prompt, prompt_name),
                      max_tokens_per_batch=max_tokens_per_batch, max_texts_per_batch=batch_size)
    progress = progress_bar(len(texts), show_progress_bar)
    try:
        embeddings, truncated = encoder.embed(texts, progress)
    finally:
        if progress is not None:
            progress.close()
    warn_truncated(truncated, len(texts), encoder.max_length)
    embeddings = compaction.apply(embeddings)
    result = torch.from_numpy(embeddings) if convert_to_tensor else embeddings
    return result[0] if single else result


def save_embeddings(embeddings: np.ndarray, output: str | Path, *, overwrite: bool = True) -> Path:
    """Write `.npy` or `.safetensors` (key "embeddings") whole, so a reader never sees a half-written file; the
    file gets the user's umask like any other. `overwrite=False` never replaces a file that exists by the time
    the embeddings are written (`OutputExistsError`)."""
    output = Path(output)
    with staged_file(output, replace=overwrite) as partial:
        if output.suffix == ".npy":
            with open(partial, "wb") as handle:
                np.save(handle, embeddings)
        else:
            from safetensors.numpy import save_file

            save_file({"embeddings": np.ascontiguousarray(embeddings)}, str(partial))
    return output


# ----------------------------------------------------------------------------------------------------------
# `diffembed encode`: a file of texts -> one embeddings file (file mode), or a corpus -> a folder (corpus mode)
# ----------------------------------------------------------------------------------------------------------

# Options that only corpus mode (an output folder) reads: given with a file output they are refused, not ignored.
CORPUS_OPTIONS = {"id_field": "--id-field", "title_field": "--title-field", "split": "--split", "subset": "--subset",
                  "shard_size": "--shard-size", "skip_bad_rows": "--skip-bad-rows", "ray": "--ray",
                  "calibration_rows": "--calibration-rows"}


def is_folder_output(output: str | Path) -> bool:
    """Corpus mode: the output ends in `/`, already exists as a folder, or has no file suffix."""
    text = str(output)
    return text.endswith(("/", "\\")) or Path(text).is_dir() or not Path(text).suffix


def check_mode_options(output: str | Path, given: dict) -> None:
    """Refuse, before any work, options that the mode `output` selects would not use (they would be ignored)."""
    if is_folder_output(output):
        if given.get("input") == "-":
            raise UsageError("corpus mode (an output folder) reads a file, a folder or a Hub dataset: pass --input")
        return
    unused = [option for name, option in CORPUS_OPTIONS.items() if given.get(name) not in (None, False)]
    if unused:
        raise UsageError(f"{', '.join(unused)} apply to corpus mode only: give --output a folder (ending in /)")


@dataclass
class EncodeOptions:
    """How `encode_file` embeds: the settings of `diffembed encode`'s file mode, checked once, here.
    `CorpusOptions` (corpus mode) adds the corpus's own. Load them from JSON with `from_file`."""

    field: str | None = None  # the text field of JSON-lines, CSV or parquet rows (None: plain lines, or "text")
    prompt_name: str | None = None  # a prompt the model stores, e.g. "query"
    max_seq_length: int | None = None  # None: the model's own
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH  # real tokens per forward pass (no padding)
    dtype: str = "float32"  # float32 or float16 (`precision` also takes the compact types)
    precision: str | None = None  # compact.PRECISIONS; None: `dtype`
    truncate_dim: int | None = None  # None: the model's stored one, else every dimension
    calibration: CalibrationRanges | str | Path | None = None  # int8/uint8 ranges of this model, or their file
    device: str | None = None  # None: cuda if available
    quantize: str | None = None  # "fp8": FP8 linear layers (CUDA)
    compile: bool = False  # torch.compile the model's forward
    overwrite: bool = False
    show_progress_bar: bool | None = None  # None: on from 256 texts
    trust_remote_code: bool = False  # let a folder's own Python code run

    def __post_init__(self):
        check_max_seq_length(self.max_seq_length)
        check_positive_int("max_tokens_per_batch", self.max_tokens_per_batch)
        check_positive_int("truncate_dim", self.truncate_dim, optional=True)
        check_choice("quantize", self.quantize, QUANTIZATIONS, optional=True)
        resolve_precision(self.dtype, self.precision)
        if isinstance(self.calibration, (str, Path)):
            self.calibration = load_calibration(self.calibration)

    @property
    def stored_precision(self) -> str:
        """The type of the stored vectors: `precision`, else `dtype`."""
        return resolve_precision(self.dtype, self.precision)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> EncodeOptions:
        """The options a JSON file of field values sets, `overrides` winning; unknown keys are an error."""
        return read_options(cls, path, "encoding", **overrides)


def encode_file(model: str, source: str, output: str | Path, options: EncodeOptions | None = None,
                **overrides) -> tuple[Path, tuple[int, int]]:
    """Embed the texts of `source` (one per line, or JSON lines; "-" for stdin) into one `.npy` / `.safetensors`
    file, one row per line, as `options` say (or the `EncodeOptions` fields given as keywords, e.g.
    `max_seq_length=512`): in `dtype`, or compact (`truncate_dim`, `precision`, int8/uint8 with `calibration`
    ranges of this model, e.g. from its corpus's manifest); returns the file and the array's shape. Everything
    that can be checked without the model (output, options, prompt name of a local folder, the input itself) is
    checked first."""
    from .outputs import check_output_file, output_lock

    options = with_overrides(EncodeOptions, options, overrides)
    output = Path(output)
    check_output_file(output, overwrite=options.overwrite, suffixes=OUTPUT_SUFFIXES)  # at once, before the lock
    # one run per file, --overwrite or not: a second run into a file being written is refused, naming this one
    with output_lock(output):
        check_output_file(output, overwrite=options.overwrite)  # again: what a run finished meanwhile left
        return _encode_file(model, source, output, options)


def _encode_file(model: str, source: str, output: Path, options: EncodeOptions) -> tuple[Path, tuple[int, int]]:
    """`encode_file` while it holds the output's lock."""
    from .model_folder import model_identity
    from .compact import SCALAR
    from .readers import read_texts

    precision, calibration = options.stored_precision, options.calibration
    if precision in SCALAR and calibration is None:
        raise CompactError(f"--precision {precision} in file mode needs --calibration (ranges of this model: a corpus "
                           "folder it encoded at that precision, or a ranges file); a handful of texts is no sample")
    folder = as_model_folder(model, trust_remote_code=options.trust_remote_code)  # opened once, for the loader
    check_prompt_name(folder, options.prompt_name)
    texts = read_texts(source, options.field)
    st_model = load_encoder(folder or model, device=options.device, max_seq_length=options.max_seq_length,
                            quantize=options.quantize, trust_remote_code=options.trust_remote_code,
                            truncate_dim=options.truncate_dim, compile=options.compile)
    if calibration is not None:  # the ranges must be this model's, at this dimension
        identity = folder.identity if folder is not None else model_identity(
            model, getattr(st_model[0].auto_model.config, "_commit_hash", None))
        calibration.check(identity.as_dict(), st_model.truncate_dim or embedding_width(st_model))
    embeddings = encode(st_model, texts, prompt_name=options.prompt_name,
                        max_tokens_per_batch=options.max_tokens_per_batch,
                        show_progress_bar=options.show_progress_bar, precision=precision, calibration=calibration)
    # without --overwrite, a file that appeared while the texts were embedded is refused, never replaced
    save_embeddings(embeddings, output, overwrite=options.overwrite)
    return output, embeddings.shape
