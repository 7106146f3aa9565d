"""Publish a DiffEmbed folder (or a LoRA adapter) to the Hugging Face Hub, with a model card, in one commit.

  * `files` - what a push sends (the file selection, checked before anything else),
  * `validate` - the staged folder loaded as a Hub user would, in a fresh offline process,
  * `upload` - staging, card and validation (`prepare_push`), then one commit (`upload`, `push`);
  * the card itself comes from `diffembed_hf.model_card`, the one builder every job uses.
"""

from ..model_folder import REMOTE_CODE_FILES
from ..errors import PublishError, PublishUsageError
from .files import files_to_push, folder_kind
from .upload import PlannedFiles, PushOptions, PushPlan, prepare_push, push, upload
from .validate import validate_folder

_CARD_NAMES = ("build_model_card", "EXAMPLE_QUERY", "EXAMPLE_DOCUMENT", "CITATION")


def __getattr__(name: str):
    # the card builder lives in diffembed_hf.model_card: re-exported lazily (it needs huggingface_hub's card code)
    if name in _CARD_NAMES:
        from .. import model_card

        return getattr(model_card, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PlannedFiles", "PublishError", "PublishUsageError", "PushOptions", "PushPlan", "REMOTE_CODE_FILES",
    "build_model_card", "files_to_push", "folder_kind", "prepare_push", "push", "upload", "validate_folder",
]
