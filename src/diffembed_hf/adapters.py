"""LoRA adapter folders and their base: where the base is without the network, and the adapter merged into it
as a standalone DiffEmbed folder. `push --merge` publishes such a folder and `export vllm` exports one; both
reach it here, below the two of them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from huggingface_hub.utils import HFValidationError

from .errors import ModelFilesError
from .model_folder import (
    LICENSE_PATTERNS,
    SENTENCE_TRANSFORMERS_FILES,
    TOKENIZER_FILES,
    check_folder,
    inside,
    is_hub_id,
    read_json,
)
from .records import TrainingRecord

logger = logging.getLogger(__name__)


def local_base_path(base: str) -> Path | None:
    """A base model folder available without the network: a local folder, or a Hub id in the local cache."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    if not is_hub_id(base):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(base, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def merge_adapter_files(adapter_folder: Path, base_path: Path, output: Path) -> None:
    """Merge a LoRA adapter into its base (PEFT's merge_and_unload) and save a standalone DiffEmbed folder:
    the base folder's tokenizer and sentence-transformers files, then the adapter folder's own, then the model.
    What `push --merge` pushes and `export vllm` exports for an adapter."""
    from peft import PeftModel

    from . import register_auto_classes
    from .modeling.modeling_diffembed import DiffEmbedForEmbedding

    register_auto_classes()  # save_pretrained then copies the remote-code files

    for source in (base_path, adapter_folder):
        check_folder(source)
        names = [*TOKENIZER_FILES, *SENTENCE_TRANSFORMERS_FILES,
                 *(p.name for pattern in LICENSE_PATTERNS for p in source.glob(pattern))]
        for name in names:
            if (source / name).is_file():
                shutil.copy2(source / name, output / name)
        modules = source / "modules.json"
        for module in read_json(modules, ModelFilesError) if modules.is_file() else []:
            module_dir = inside(source, module["path"], what=str(modules)) if module.get("path") else None
            if module_dir is not None and module_dir.is_dir():
                shutil.copytree(module_dir, output / module["path"], dirs_exist_ok=True)
    if (adapter_folder / TrainingRecord.FILE).is_file():  # the adapter's training, never the base's own record
        shutil.copy2(adapter_folder / TrainingRecord.FILE, output / TrainingRecord.FILE)
    base = DiffEmbedForEmbedding.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()
    merged.save_pretrained(output)
    logger.info("Merged the adapter %s into %s", adapter_folder, base_path)
