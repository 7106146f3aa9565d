"""The one writer of sentence-transformers files: every folder this package writes (convert, train, demo, the
vLLM export) gets them from `write_sentence_transformer_files`.

The files are written in sentence-transformers' legacy format (module types under `sentence_transformers.models`,
`max_seq_length` in `sentence_bert_config.json`), which 5.x reads natively and 6.x maps, whereas a folder saved by
6.x does not load in 5.x. The pooling config carries both key styles (`pooling_mode: "mean"` and the legacy
`pooling_mode_mean_tokens`), which sentence-transformers 5 and 6, vLLM and TEI all read. Without `modules.json`,
sentence-transformers would build Transformer + mean Pooling and silently drop the Normalize step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import register_auto_classes
from .validation import MAX_SEQ_LENGTH

logger = logging.getLogger(__name__)
register_auto_classes()  # save_pretrained then copies the remote-code files into every folder it writes

# The study's query format: an instruction, then the query (LLM2Vec style); documents carry no instruction.
# Prompts end in ":\n", where Qwen's pre-tokenizer always cuts, so the prompt's tokens are exactly the prefix of
# prompt + text (sentence-transformers relies on that to leave the prompt out of the mean when asked to).
DEFAULT_QUERY_PROMPT = "Given a web search query, retrieve relevant passages that answer the query:\n"

# The study's task instructions for the reasoning benchmark (BRIGHT), usable as `prompt_name=...`.
TASK_PROMPTS = {
    "theoremqa_theorems": "Given a problem, retrieve the relevant theorems that help solve the given problem:\n",
    "theoremqa_questions": "Given a problem, retrieve the relevant problems that can be solved by the similar "
                           "theorems:\n",
    "aops": "Given a problem, retrieve the relevant problems that can be solved by the similar math theorems:\n",
    "leetcode": (
        "Given a coding problem, retrieve the relevant problems that can be solved by the similar algorithms "
        "or data structures:\n"
    ),
}



def instruction_prompt(instruction: str | None) -> str:
    """THE rule for turning an instruction into the text put before a query, everywhere (training rows, the trained
    model's stored query prompt, `evaluate --instructions` and `--query-prompt`): '<instruction>:\n', whether or
    not the instruction already ends in ':' or ':\n' (so a stored prompt maps to itself); no instruction, no
    prompt."""
    if not instruction or not instruction.strip():
        return ""
    return instruction.strip().rstrip(":") + ":\n"


def default_prompts() -> dict[str, str]:
    """`query` (instruction + query), `document` (bare) and the study's named task prompts."""
    return {"query": DEFAULT_QUERY_PROMPT, "document": "", **TASK_PROMPTS}


# Legacy boolean keys (sentence-transformers < 6, vLLM, TEI) next to the single `pooling_mode` key (6.x).
_LEGACY_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}  # fmt: skip


def _write_json(path: Path, data: dict | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def pooling_modes(pooling: dict) -> list[str]:
    """The pooling modes a `1_Pooling/config.json` asks for, in either key style."""
    if "pooling_mode" in pooling:
        mode = pooling["pooling_mode"]
        return [mode] if isinstance(mode, str) else list(mode)
    return [mode for mode, key in _LEGACY_POOLING_KEYS.items() if pooling.get(key)]


def write_sentence_transformer_files(
    folder: str | Path,
    *,
    max_seq_length: int = MAX_SEQ_LENGTH,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    include_prompt: bool = True,
    normalize: bool = True,
    dimension: int | None = None,
    truncate_dim: int | None = None,
) -> None:
    """Write modules.json, sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/ and
    2_Normalize/ (unless `normalize=False`) into a model folder that already holds config.json.

    `include_prompt=True` keeps the instruction tokens in the mean, as the study does. `dimension` is the
    embedding width; by default the folder's DiffEmbed config gives it (an engine export passes its own).
    `truncate_dim` is stored in
    config_sentence_transformers.json, where sentence-transformers (>= 5.4) reads it: `SentenceTransformer(folder)`
    then returns that many dimensions (for a Matryoshka-trained model).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: write the model (save_pretrained) first")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if dimension is None and config.get("model_type") != "diffembed":
        raise ValueError(f"{config_path} is not a DiffEmbed config (model_type={config.get('model_type')!r})")
    max_positions = config.get("max_position_embeddings")
    if max_positions and max_seq_length > max_positions:
        raise ValueError(f"max_seq_length={max_seq_length} exceeds max_position_embeddings={max_positions}")
    prompts = default_prompts() if prompts is None else prompts
    if truncate_dim is not None and not 1 <= truncate_dim <= config["hidden_size"]:
        raise ValueError(f"truncate_dim={truncate_dim} must be between 1 and the hidden size {config['hidden_size']}")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name={default_prompt_name!r} is not one of the prompts {sorted(prompts)}")

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(
        folder / "config_sentence_transformers.json",
        {"prompts": prompts, "default_prompt_name": default_prompt_name, "similarity_fn_name": "cosine",
         **({"truncate_dim": truncate_dim} if truncate_dim is not None else {})},
    )
    _write_json(
        folder / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": dimension or config["hidden_size"],
            "pooling_mode": "mean",
            **{key: mode == "mean" for mode, key in _LEGACY_POOLING_KEYS.items()},
            "include_prompt": include_prompt,
        },
    )
    if normalize:
        (folder / "2_Normalize").mkdir(exist_ok=True)
    # DEBUG: the folder is usually a job's staging folder, whose temporary name means nothing to a user
    logger.debug("Wrote sentence-transformers files to %s (max_seq_length=%d)", folder, max_seq_length)


def save_sentence_transformer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    **kwargs,
) -> Path:
    """Save a `DiffEmbedForEmbedding` and its tokenizer as one folder that loads with `AutoModel` and with
    `SentenceTransformer` (both with `trust_remote_code=True`). `kwargs` go to
    `write_sentence_transformer_files`."""
    output_dir = Path(output_dir)
    if tokenizer.pad_token is None:
        raise ValueError("The tokenizer has no pad token; batches cannot be padded. Set tokenizer.pad_token first.")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_sentence_transformer_files(output_dir, **kwargs)
    return output_dir
