"""The push itself: stage the files and the card (`prepare_push`), validate, then send one commit (`upload`).

  * the folder is checked (a DiffEmbed config with `auto_map`, its code files, weights, tokenizer, modules.json),
    the repo id is validated and a token is found (`token=`, `HF_TOKEN`, then the login cache): these fail with
    a clear `PublishError` before any network call;
  * the files are staged (links to the folder's files plus the generated card) in a temporary folder, and that
    staged folder is loaded in a fresh offline process that cannot import this package, through `AutoModel` and
    `SentenceTransformer` with `trust_remote_code=True`; the push is refused unless both load, give finite unit
    vectors and agree. What was validated is exactly what is uploaded.

The user's folder is never written to (unless `write_card=True` asks for the card to be saved there). The upload
uses huggingface_hub's own client (`create_repo`, `create_branch`, `create_commit`), so `HF_ENDPOINT`,
`HF_TOKEN` and the login cache work as with every Hugging Face tool. `create_commit` is used rather than
`upload_folder` because, with `hf_xet` installed, huggingface_hub 2.x turns `upload_folder` into a multi-commit
pipeline; one explicit commit keeps a push atomic. Files already on the Hub with the same content are dropped
from the commit by the client, so pushing an unchanged folder again creates no commit at all.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, get_token
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

try:  # huggingface_hub >= 2 runs on httpx2, 1.x on httpx: transport errors (refused connection...) come from there
    from httpx2 import HTTPError as _TransportError
except ImportError:
    from httpx import HTTPError as _TransportError

from .. import __version__
from .. import model_card as cards
from ..checkpoint import (
    ADAPTER_CONFIG,
    LICENSE_PATTERNS,
    SENTENCE_TRANSFORMERS_FILES,
    TOKENIZER_FILES,
    check_folder,
    check_model_files,
    check_remote_code,
    inside,
    is_hub_id,
    read_json,
)
from ..errors import EvaluationError, PublishError, PublishUsageError
from ..evaluation.card import stored_results
from ..files import write_text
from ..records import TrainingRecord
from ..validation import read_options, with_overrides
from .files import files_to_push, folder_kind
from .validate import validate_folder

logger = logging.getLogger(__name__)

STALE_ON_HUB = {
    "model": ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
              "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.*"),
    "adapter": ("adapter_model.*",),
}


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


# ----------------------------------------------------------------------------------------------------------
# Plan (stage + card + validation) and upload
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PushPlan:
    """What a push sends: `staging` holds links to the folder's files and the generated ones (README.md, a
    rewritten adapter_config.json), exactly the tree the Hub repo will get. Use as a context manager (or call
    `cleanup`) to remove the staging folder."""

    folder: Path
    repo_id: str
    kind: str
    staging: Path
    card: ModelCard
    generated: list[str]
    validation: dict | None
    notes: list[str] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def paths(self) -> list[str]:
        return sorted(p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file())

    def describe(self) -> str:
        """A listing of the files and their origin, for dry runs and logs."""
        lines = [f"{len(self.paths)} files for {self.repo_id} ({self.kind}) from {self.folder}:"]
        for path in self.paths:
            origin = "generated" if path in self.generated else "folder"
            lines.append(f"  {path:<48} {(self.staging / path).stat().st_size:>14,} B  {origin}")
        if self.validation is None:
            lines.append("validation: SKIPPED (not loaded before pushing)")
        else:
            lines.append(f"validation: passed (AutoModel + SentenceTransformer in a fresh offline process; "
                         f"{self.validation.get('dtype')}, dimension {self.validation.get('dimension')}, "
                         f"max difference {self.validation.get('max_difference', 0):.1e})")
        lines += self.notes
        return "\n".join(lines)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PushPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def merge_adapter_files(adapter_folder: Path, base_path: Path, output: Path) -> None:
    """Merge a LoRA adapter into its base (PEFT's merge_and_unload) and save a standalone DiffEmbed folder:
    the base folder's tokenizer and sentence-transformers files, then the adapter folder's own, then the model.
    What `push --merge` pushes and `export vllm` exports for an adapter."""
    from peft import PeftModel

    from .. import register_auto_classes
    from ..modeling.modeling_diffembed import DiffEmbedForEmbedding

    register_auto_classes()  # save_pretrained then copies the remote-code files

    for source in (base_path, adapter_folder):
        check_folder(source)
        names = [*TOKENIZER_FILES, *SENTENCE_TRANSFORMERS_FILES,
                 *(p.name for pattern in LICENSE_PATTERNS for p in source.glob(pattern))]
        for name in names:
            if (source / name).is_file():
                shutil.copy2(source / name, output / name)
        modules = source / "modules.json"
        for module in read_json(modules, PublishError) if modules.is_file() else []:
            module_dir = inside(source, module["path"], what=str(modules)) if module.get("path") else None
            if module_dir is not None and module_dir.is_dir():
                shutil.copytree(module_dir, output / module["path"], dirs_exist_ok=True)
    if (adapter_folder / TrainingRecord.FILE).is_file():  # the adapter's training, never the base's own record
        shutil.copy2(adapter_folder / TrainingRecord.FILE, output / TrainingRecord.FILE)
    base = DiffEmbedForEmbedding.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()
    merged.save_pretrained(output)
    logger.info("Merged the adapter %s into %s", adapter_folder, base_path)


def prepare_push(
    folder: str | Path,
    repo_id: str,
    *,
    merge_adapter: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    language: list[str] | None = None,
    card: str | Path | None = None,
    overwrite_card: bool = False,
    validate: bool = True,
    eval_results: str | Path | None = None,
    trust_remote_code: bool = False,
) -> PushPlan:
    """Check `folder`, build its card and stage the upload, then validate the staged tree (see module doc).

    An adapter folder is pushed as an adapter whose card and adapter_config.json name its base model by Hub id
    (`base_model`, required when the adapter's base is a local folder), or, with `merge_adapter=True`, merged
    into its base (a local folder or a cached Hub id) and pushed as a standalone model. `card` pushes that file
    as README.md instead of the folder's own card. The folder's README.md is pushed as it is when it is hand-written
(or hand-edited); a card generated by this package, or none, is (re)generated for `repo_id`, as it is with
`overwrite_card=True` whatever the folder holds. Adapters are validated by loading their base offline with the
    adapter applied; when the base is not available offline the push is refused unless `validate=False`.
    A folder holding code of its own (any Python file other than this package's own remote code, a modules.json
    type outside sentence-transformers: `checkpoint.foreign_code`) is refused unless `trust_remote_code=True`,
    validated or not: validation runs it here, and Hub users would run it.
    `eval_results` (a `diffembed evaluate --output` folder; default FOLDER/eval) puts benchmark results on the card.
    """
    folder = Path(folder).expanduser().resolve()
    kind = folder_kind(folder)
    if card is not None and not Path(card).is_file():
        raise PublishUsageError(f"card={str(card)!r} (--card) is not a file")
    if merge_adapter and kind != "adapter":
        raise PublishUsageError(f"merge_adapter=True needs a LoRA adapter folder; {folder} is a full model")
    # what a push publishes, Hub users run, and validation runs here: the folder's own code needs the user's opt-in
    check_remote_code(folder, trust_remote_code, action="pushing it (and validating it)")
    tmp = tempfile.TemporaryDirectory(prefix="diffembed-push-")
    try:
        staging, notes, generated, base_path = Path(tmp.name) / "repo", [], [], None
        source = folder
        if kind == "adapter":
            adapter = read_json(folder / ADAPTER_CONFIG, PublishError)
            base_path = local_base_path(adapter["base_model_name_or_path"])
            if merge_adapter:
                if base_path is None:
                    raise PublishError(f"Cannot merge: the adapter's base {adapter['base_model_name_or_path']!r} "
                                       "is neither a local folder nor in the Hugging Face cache")
                if folder_kind(base_path) != "model":
                    raise PublishError(f"Cannot merge: the adapter's base {base_path} is not a DiffEmbed model")
                source = Path(tmp.name) / "merged"
                source.mkdir()
                merge_adapter_files(folder, base_path, source)
                kind, base_path = "model", None
                notes.append(f"merged: the adapter was merged into {adapter['base_model_name_or_path']}")
            else:
                base_model = base_model or (adapter["base_model_name_or_path"]
                                            if is_hub_id(adapter["base_model_name_or_path"]) else None)
                if base_model is None:
                    raise PublishError(
                        f"The adapter's base model is the local folder {adapter['base_model_name_or_path']!r}, "
                        "which Hub users cannot load: pass base_model= (--base-model) with the Hub id where that "
                        "base is published, or merge_adapter=True (--merge) to push a standalone model")
                if not is_hub_id(base_model):
                    raise PublishUsageError(f"base_model={base_model!r} is not a Hub id (namespace/name)")

        if source != folder:  # merged: the base's files came along
            check_remote_code(source, trust_remote_code, action="pushing the merged model (and validating it)")
        files = files_to_push(source)
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(source / rel, staging / rel)  # no copy of multi-GB weights
            except OSError:  # a filesystem (or Windows account) without symbolic links
                shutil.copy2(source / rel, staging / rel)
        if kind == "adapter" and adapter["base_model_name_or_path"] != base_model:
            # Hub users' PEFT and transformers load the base from here: it must be the Hub id, not a local path
            (staging / ADAPTER_CONFIG).unlink()
            (staging / ADAPTER_CONFIG).write_text(
                json.dumps({**adapter, "base_model_name_or_path": base_model}, indent=2) + "\n", encoding="utf-8")
            generated.append(ADAPTER_CONFIG)
            notes.append(f"adapter_config.json: base_model_name_or_path rewritten to {base_model!r}")

        own_card = folder / "README.md"
        if card is not None:
            model_card = ModelCard.load(Path(card))
            notes.append(f"README.md: {card} as given")
        elif own_card.is_file() and not overwrite_card and not cards.is_replaceable_card(own_card.read_text("utf-8")):
            model_card = ModelCard.load(own_card)
            notes.append("README.md: the folder's own hand-written card (--overwrite-card generates one instead)")
        else:
            # the lineage is read from the user's folder: a merged copy has lost its adapter config. Results count
            # when the user's folder made them (an adapter embeds as its merged copy does), also under FOLDER/eval
            stored = _stored_results(folder, eval_results)
            model_card = cards.build_model_card(
                source, repo_id, license=license, language=language,
                base_model=base_model or cards.lineage_base_model(folder),
                eval_results=stored.eval_results if stored else None,
                extra_sections=["\n".join(stored.lines)] if stored else ())
            generated.append("README.md")
        (staging / "README.md").write_text(str(model_card), encoding="utf-8")

        validation = None
        if validate:
            if kind == "adapter" and base_path is None:
                raise PublishError(
                    f"Cannot validate the adapter: its base {adapter['base_model_name_or_path']!r} is not available "
                    "offline (a local folder or the Hugging Face cache). Download it first, or pass "
                    "validate=False (--skip-validation) to push it unvalidated.")
            if base_path is not None:  # validation loads the adapter's base with remote code allowed
                check_remote_code(base_path, trust_remote_code, action="validating the adapter before the push")
            try:
                validation = validate_folder(staging, base_model_path=base_path, name=folder)
            except PublishError:
                # the fresh process reports what its loader raised; name the damaged file where there is one
                for loaded in (source, base_path):
                    if loaded is not None and folder_kind(loaded) == "model":
                        check_model_files(loaded, deep=True)
                raise
        return PushPlan(folder, repo_id, kind, staging, model_card, generated, validation, notes, tmp)
    except BaseException:
        tmp.cleanup()
        raise


def _stored_results(folder: Path, results: str | Path | None):
    """The results of `diffembed evaluate` for the card (`evaluation.card.stored_results`), their problems in
    push's terms: results the user named that cannot be used are a usage error, FOLDER/eval's a PublishError."""
    try:
        return stored_results(folder, results)
    except EvaluationError as err:
        raise (PublishError if results is None else PublishUsageError)(str(err)) from None


class PlannedFiles(list):
    """The paths a dry run would push; `card_generated` says whether README.md is a generated card."""

    def __init__(self, paths: list[str], card_generated: bool):
        super().__init__(paths)
        self.card_generated = card_generated


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishUsageError(f"Invalid repo id {repo_id!r}: {err}") from err


def _stale_on_hub(remote: list[str], kind: str, pushed: list[str]) -> list[str]:
    patterns = STALE_ON_HUB[kind]
    return sorted(path for path in remote if "/" not in path and path not in pushed
                  and any(fnmatch.fnmatch(path, pattern) for pattern in patterns))


def upload(
    plan: PushPlan,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Send a prepared plan in one commit: create the repo (exist_ok) and the branch if needed, delete weight
    files an earlier push left that would shadow the new ones, then commit. A failure is raised as PublishError
    naming the step; a Hub commit is atomic, so nothing is half-pushed and re-running resumes cleanly."""
    api = HfApi(endpoint=endpoint, token=token, library_name="diffembed-hf", library_version=__version__)
    repo_id, step = plan.repo_id, "creating the repository"
    message = commit_message or (f"Upload DiffEmbed {'LoRA adapter' if plan.kind == 'adapter' else 'model'} "
                                 f"with diffembed-hf {__version__}")
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and not create_pr and not revision.startswith("refs/pr/"):
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "listing the files already on the Hub"
        stale = _stale_on_hub(api.list_repo_files(repo_id, revision=revision), plan.kind, plan.paths)
        operations = [CommitOperationDelete(path_in_repo=path) for path in stale]
        operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(plan.staging / path))
                       for path in plan.paths]
        step = "committing"
        logger.info("Pushing %d files to %s%s%s", len(plan.paths), repo_id, f"@{revision}" if revision else "",
                    " as a pull request" if create_pr else "")
        if stale:
            logger.info("Deleting stale weight files on the Hub: %s", ", ".join(stale))
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr,
            commit_description=(f"{len(plan.paths)} files from diffembed-hf {__version__}; "
                                + ("validated offline with AutoModel and SentenceTransformer (trust_remote_code)."
                                   if plan.validation else "not validated before pushing.")),
        )
    except (OSError, _TransportError, ValueError) as err:
        raise PublishError(
            f"Pushing {plan.folder} to {repo_id} failed while {step}: {err}\nNothing was committed (a Hub commit "
            f"is atomic) and {plan.folder} is unchanged; run the same push again to retry."
        ) from err
    logger.info("Pushed %s to %s", plan.folder, info.pr_url or info.commit_url)
    return info


@dataclass
class PushOptions:
    """How `push` publishes a folder: where on the Hub, what card, what is validated, checked once, here.
    Load them from JSON with `from_file`."""

    token: str | None = field(default=None, repr=False)  # None: HF_TOKEN, else the login cache; never shown
    private: bool | None = None  # None: the Hub's default; ignored for an existing repo
    revision: str | None = None  # a branch (created if missing) or refs/pr/N
    create_pr: bool = False  # open a pull request against `revision`
    commit_message: str | None = None
    endpoint: str | None = None  # None: HF_ENDPOINT
    dry_run: bool = False  # everything but the upload; writes nothing anywhere
    merge_adapter: bool = False  # push a LoRA adapter merged into its base
    base_model: str | None = None  # an adapter's base by Hub id (required when its base is a local folder)
    license: str | None = None
    language: list[str] | None = None
    card: str | Path | None = None  # push this file as README.md instead of the folder's card
    write_card: bool = False  # also save the generated card as the folder's README.md
    overwrite_card: bool = False  # regenerate the card over a hand-written one
    validate: bool = True  # load the staged folder as a Hub user would before sending it
    eval_results: str | Path | None = None  # a `diffembed evaluate --output` folder (default FOLDER/eval)
    trust_remote_code: bool = False  # push (and validate) a folder holding code of its own

    def __post_init__(self):
        if self.write_card and self.card is not None:
            raise PublishUsageError("write_card=True (--write-card) saves the generated card; it cannot be combined "
                                    "with card= (--card)")
        if self.create_pr and self.revision and self.revision.startswith("refs/pr/"):
            raise PublishUsageError(f"create_pr=True opens a new pull request; revision={self.revision!r} already "
                                    "is one")
        if isinstance(self.language, str):
            self.language = [self.language]

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> PushOptions:
        """The options a JSON file of field values sets, `overrides` winning; unknown keys are an error."""
        return read_options(cls, path, "push", **overrides)


def push(folder: str | Path, repo_id: str, options: PushOptions | None = None,
         **overrides) -> CommitInfo | PlannedFiles:
    """Push a DiffEmbed folder (or LoRA adapter) to the Hub in one commit, after checking and validating it.
    `options` is a `PushOptions`; its fields may also be given as keywords (`dry_run=True`), over `options`.

    The repo id, the folder and the token (`token`, else `HF_TOKEN`, else the login cache) are checked before any
    network call. `private=None` keeps the Hub's default (public unless the organisation says otherwise) and is
    ignored for an existing repo. `revision` is a branch (created if missing) or `refs/pr/N`; `create_pr` opens a
    pull request against it. `endpoint` defaults to `HF_ENDPOINT`. `dry_run=True` does everything but the upload
    and returns the paths that would be sent; it writes nothing anywhere. `write_card=True` also saves the generated
card as `folder/README.md`, never over a hand-written one unless `overwrite_card=True`.
    See `prepare_push` for adapters, `merge_adapter`, `base_model`, `card` and `eval_results`.
    """
    options = with_overrides(PushOptions, options, overrides)
    _check_repo_id(repo_id)
    readme = Path(folder).expanduser() / "README.md"
    if (options.write_card and not options.overwrite_card and readme.is_file()
            and not cards.is_replaceable_card(readme.read_text(encoding="utf-8"))):
        raise PublishUsageError(f"{readme} is a hand-written card; pass overwrite_card=True (--overwrite-card) to "
                                "replace it with the generated one")
    token = options.token
    if not options.dry_run:
        if hf_constants.HF_HUB_OFFLINE:
            raise PublishUsageError("HF_HUB_OFFLINE is set, so huggingface_hub refuses every request; unset it to push")
        token = token or get_token()
        if not token:
            raise PublishUsageError("No Hugging Face token: set HF_TOKEN, log in with `hf auth login`, or pass token= "
                                    "(--token). Pushing needs a token with write access.")
    o = options
    with prepare_push(folder, repo_id, merge_adapter=o.merge_adapter, base_model=o.base_model, license=o.license,
                      language=o.language, card=o.card, overwrite_card=o.overwrite_card, validate=o.validate,
                      eval_results=o.eval_results, trust_remote_code=o.trust_remote_code) as plan:
        logger.debug("%s", plan.describe())
        if o.dry_run:  # a dry run changes nothing, anywhere
            return PlannedFiles(plan.paths, card_generated="README.md" in plan.generated)
        if o.write_card:
            write_text(plan.folder / "README.md", str(plan.card))  # whole, with the user's umask
            logger.info("Wrote the model card to %s", plan.folder / "README.md")
        return upload(plan, token=token, private=o.private, revision=o.revision, create_pr=o.create_pr,
                      commit_message=o.commit_message, endpoint=o.endpoint)
