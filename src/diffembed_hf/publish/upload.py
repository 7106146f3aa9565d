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
from ..adapters import local_base_path, merge_adapter_files
from ..model_folder import ADAPTER_CONFIG, check_model_files, check_remote_code, is_hub_id, read_json
from ..errors import EvaluationError, PublishError, PublishUsageError
from ..evaluation.card import stored_results
from ..outputs import write_text
from ..validation import read_options, with_overrides
from .files import files_to_push, folder_kind
from .validate import validate_folder

logger = logging.getLogger(__name__)

STALE_ON_HUB = {
    "model": ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
              "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.*"),
    "adapter": ("adapter_model.*",),
}


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


def prepare_push(folder: str | Path, repo_id: str, options: PushOptions | None = None, **overrides) -> PushPlan:
    """Check `folder`, build its card and stage the upload, then validate the staged tree (see module doc).

    An adapter folder is pushed as an adapter whose card and adapter_config.json name its base model by Hub id
    (`base_model`, required when the adapter's base is a local folder), or, with `merge_adapter=True`, merged
    into its base (a local folder or a cached Hub id) and pushed as a standalone model. `card` pushes that file
    as README.md instead of the folder's own card. The folder's README.md is pushed as it is when it is hand-written
    (or hand-edited); a card generated by this package, or none, is (re)generated for `repo_id`, as it is with
    `overwrite_card=True` whatever the folder holds. Adapters are validated by loading their base offline with the
    adapter applied; when the base is not available offline the push is refused unless `validate=False`.
    A folder holding code of its own (any Python file other than this package's own remote code, a modules.json
    type outside sentence-transformers: `model_folder.foreign_code`) is refused unless `trust_remote_code=True`,
    validated or not: validation runs it here, and Hub users would run it.
    `eval_results` (a `diffembed evaluate --output` folder; default FOLDER/eval) puts benchmark results on the card.
    """
    o = with_overrides(PushOptions, options, overrides)
    folder = Path(folder).expanduser().resolve()
    kind = folder_kind(folder)
    if o.card is not None and not Path(o.card).is_file():
        raise PublishUsageError(f"card={str(o.card)!r} (--card) is not a file")
    if o.merge_adapter and kind != "adapter":
        raise PublishUsageError(f"merge_adapter=True needs a LoRA adapter folder; {folder} is a full model")
    # what a push publishes, Hub users run, and validation runs here: the folder's own code needs the user's opt-in
    check_remote_code(folder, o.trust_remote_code, action="pushing it (and validating it)")
    tmp = tempfile.TemporaryDirectory(prefix="diffembed-push-")
    try:
        staging, notes, generated = Path(tmp.name) / "repo", [], []
        source, kind, adapter, base_path, base_model = _adapter_source(folder, kind, Path(tmp.name), o, notes)
        if source != folder:  # merged: the base's files came along
            check_remote_code(source, o.trust_remote_code, action="pushing the merged model (and validating it)")
        _stage(source, staging)
        if kind == "adapter" and adapter["base_model_name_or_path"] != base_model:
            # Hub users' PEFT and transformers load the base from here: it must be the Hub id, not a local path
            (staging / ADAPTER_CONFIG).unlink()
            (staging / ADAPTER_CONFIG).write_text(
                json.dumps({**adapter, "base_model_name_or_path": base_model}, indent=2) + "\n", encoding="utf-8")
            generated.append(ADAPTER_CONFIG)
            notes.append(f"adapter_config.json: base_model_name_or_path rewritten to {base_model!r}")
        model_card = _card(folder, source, repo_id, base_model, o, generated, notes)
        (staging / "README.md").write_text(str(model_card), encoding="utf-8")
        validation = None
        if o.validate:
            validation = _validate_staged(folder, source, staging, kind, adapter, base_path, o.trust_remote_code)
        return PushPlan(folder, repo_id, kind, staging, model_card, generated, validation, notes, tmp)
    except BaseException:
        tmp.cleanup()
        raise


def _adapter_source(folder: Path, kind: str, tmp: Path, o: PushOptions, notes: list[str]):
    """(source, kind, adapter config, local base path, base model Hub id) of what is pushed: the folder itself, or
    an adapter merged into its base under `tmp`."""
    base_model = o.base_model
    if kind != "adapter":
        return folder, kind, None, None, base_model
    adapter = read_json(folder / ADAPTER_CONFIG, PublishError)
    base_path = local_base_path(adapter["base_model_name_or_path"])
    if o.merge_adapter:
        if base_path is None:
            raise PublishError(f"Cannot merge: the adapter's base {adapter['base_model_name_or_path']!r} "
                               "is neither a local folder nor in the Hugging Face cache")
        if folder_kind(base_path) != "model":
            raise PublishError(f"Cannot merge: the adapter's base {base_path} is not a DiffEmbed model")
        source = tmp / "merged"
        source.mkdir()
        merge_adapter_files(folder, base_path, source)
        notes.append(f"merged: the adapter was merged into {adapter['base_model_name_or_path']}")
        return source, "model", adapter, None, base_model
    base_model = base_model or (adapter["base_model_name_or_path"]
                                if is_hub_id(adapter["base_model_name_or_path"]) else None)
    if base_model is None:
        raise PublishError(
            f"The adapter's base model is the local folder {adapter['base_model_name_or_path']!r}, "
            "which Hub users cannot load: pass base_model= (--base-model) with the Hub id where that "
            "base is published, or merge_adapter=True (--merge) to push a standalone model")
    if not is_hub_id(base_model):
        raise PublishUsageError(f"base_model={base_model!r} is not a Hub id (namespace/name)")
    return folder, kind, adapter, base_path, base_model


def _stage(source: Path, staging: Path) -> None:
    """Links to the files a push sends (copies where the filesystem has no links): no copy of multi-GB weights."""
    for rel in files_to_push(source):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(source / rel, staging / rel)
        except OSError:  # a filesystem (or Windows account) without symbolic links
            shutil.copy2(source / rel, staging / rel)


def _card(folder: Path, source: Path, repo_id: str, base_model: str | None, o: PushOptions,
          generated: list[str], notes: list[str]) -> ModelCard:
    """The card pushed as README.md: the given file, the folder's hand-written card, or a generated one."""
    own_card = folder / "README.md"
    if o.card is not None:
        notes.append(f"README.md: {o.card} as given")
        return ModelCard.load(Path(o.card))
    if own_card.is_file() and not o.overwrite_card and not cards.is_replaceable_card(own_card.read_text("utf-8")):
        notes.append("README.md: the folder's own hand-written card (--overwrite-card generates one instead)")
        return ModelCard.load(own_card)
    # the lineage is read from the user's folder: a merged copy has lost its adapter config. Results count
    # when the user's folder made them (an adapter embeds as its merged copy does), also under FOLDER/eval
    stored = _stored_results(folder, o.eval_results)
    generated.append("README.md")
    return cards.build_model_card(
        source, repo_id, license=o.license, language=o.language,
        base_model=base_model or cards.lineage_base_model(folder),
        eval_results=stored.eval_results if stored else None,
        extra_sections=["\n".join(stored.lines)] if stored else ())


def _validate_staged(folder: Path, source: Path, staging: Path, kind: str, adapter: dict | None,
                     base_path: Path | None, trust_remote_code: bool) -> dict:
    """Load the staged tree as a Hub user would (`validate_folder`); a failure names the damaged file if any."""
    if kind == "adapter" and base_path is None:
        raise PublishError(
            f"Cannot validate the adapter: its base {adapter['base_model_name_or_path']!r} is not available "
            "offline (a local folder or the Hugging Face cache). Download it first, or pass "
            "validate=False (--skip-validation) to push it unvalidated.")
    if base_path is not None:  # validation loads the adapter's base with remote code allowed
        check_remote_code(base_path, trust_remote_code, action="validating the adapter before the push")
    try:
        return validate_folder(staging, base_model_path=base_path, name=folder)
    except PublishError:
        # the fresh process reports what its loader raised; name the damaged file where there is one
        for loaded in (source, base_path):
            if loaded is not None and folder_kind(loaded) == "model":
                check_model_files(loaded, deep=True)
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
    with prepare_push(folder, repo_id, o) as plan:
        logger.debug("%s", plan.describe())
        if o.dry_run:  # a dry run changes nothing, anywhere
            return PlannedFiles(plan.paths, card_generated="README.md" in plan.generated)
        if o.write_card:
            write_text(plan.folder / "README.md", str(plan.card))  # whole, with the user's umask
            logger.info("Wrote the model card to %s", plan.folder / "README.md")
        return upload(plan, token=token, private=o.private, revision=o.revision, create_pr=o.create_pr,
                      commit_message=o.commit_message, endpoint=o.endpoint)
