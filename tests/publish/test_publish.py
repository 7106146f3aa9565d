"""Publishing to the Hub: the real huggingface_hub client against a local Hub-compatible server
(tests/helpers/fake_hub.py).

Nothing here mocks HfApi: every push goes through huggingface_hub's own HTTP calls to 127.0.0.1, and what the
server received is compared with the folder and loaded back (in a fresh process that cannot import diffembed_hf).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from helpers.fake_hub import FakeHub
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file

from diffembed_hf import DiffEmbedForEmbedding, __version__, load_dream_tokenizer
from diffembed_hf.cli import main as cli_main
from diffembed_hf.publish import (
    EXAMPLE_DOCUMENT,
    EXAMPLE_QUERY,
    REMOTE_CODE_FILES,
    PublishError,
    build_model_card,
    files_to_push,
    push,
)
from diffembed_hf.sentence_transformer import DEFAULT_QUERY_PROMPT

# Dream's vocabulary (the real tokenizer) at a width that keeps the checkpoint at ~10 MB
SMALL = dict(vocab_size=151667, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
MAX_LEN = 48
TOKEN = "hf_fake_write_token"
TRAINING = {
    "base_model": "Dream-org/Dream-v0-Instruct-7B",
    "datasets": ["siyue/ReasonAug", "/home/someone/private/extra.jsonl"],
    "hyperparameters": {"learning_rate": 0.0001, "lora_r": 16, "max_steps": 1000,
                        "lora_target_modules": ["q_proj", "v_proj"]},
    "evaluation": {"split": "held-out 5% of siyue/ReasonAug",
                   "metrics": {"ndcg@10": 0.4321, "mrr@10": 0.3876},
                   "metrics_before_training": {"ndcg@10": 0.1234, "mrr@10": 0.1111}},
    "training_time_seconds": 3725.0,
}
MODEL_FILES = [
    "1_Pooling/config.json", "README.md", "attention_kernels.py", "config.json", "config_sentence_transformers.json",
    "configuration_diffembed.py", "model.safetensors", "modeling_diffembed.py", "modules.json",
    "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json",
]
MESSAGE = f"Upload DiffEmbed model with diffembed-hf {__version__}"


@pytest.fixture(scope="module")
def tokenizer():
    return load_dream_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_folders):
    """A trained-looking DiffEmbed folder: model, tokenizer, sentence-transformers files, training record,
    plus what must never be pushed (a training checkpoint, a pickle, a cache)."""
    path = tiny_folders.copy(tmp_path_factory.mktemp("pub") / "model", seed=5, max_seq_length=MAX_LEN, pad_token_id=0,
                             **SMALL)
    (path / "diffembed_training.json").write_text(json.dumps(TRAINING))
    (path / "checkpoint-500").mkdir()
    (path / "checkpoint-500" / "optimizer.pt").write_bytes(b"pickle")
    (path / "training_args.bin").write_bytes(b"pickle")
    (path / "__pycache__").mkdir()
    (path / "__pycache__" / "x.pyc").write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, folder, tokenizer):
    """A LoRA adapter folder as `diffembed train --adapter-only` writes it; its base is the local `folder`."""
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("pub") / "adapter"
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(DiffEmbedForEmbedding.from_pretrained(folder), config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "diffembed_training.json").write_text(json.dumps({**TRAINING, "base_model": str(folder)}))
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh fake Hub; huggingface_hub is put online (conftest sets HF_HUB_OFFLINE=1 for the suite) and pointed
    at it, so that no request, not even the client's own telemetry, can leave the loopback interface."""
    with FakeHub(tmp_path / "hub", tokens={TOKEN: "user", "hf_cache_token": "user"}) as server:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def hashes(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def api_calls(hub):
    """The protocol calls received, without huggingface_hub 2.x's best-effort telemetry."""
    return [r["endpoint"] for r in hub.requests if r["endpoint"] != "agent_harnesses"]


def embed(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).embeddings.numpy()


def clone(folder, dest, skip=()):
    """A copy of `folder` minus `skip`: weights hard-linked (cheap; never written in place), the rest copied (a test
    may edit it; a symbolic link leading out of a folder would be refused)."""
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() not in skip:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                os.link(path, dest / rel)
            else:
                shutil.copy2(path, dest / rel)
    dest.mkdir(exist_ok=True)
    return dest


# Runs the card's Python blocks as pasted, as a Hub user without diffembed_hf: downloads from the fake Hub.
PASTE = textwrap.dedent(
    """
    import sys, numpy as np
    sys.modules["diffembed_hf"] = None
    namespace = {}
    exec(open(sys.argv[1]).read(), namespace)
    np.savez(sys.argv[2], queries=np.asarray(namespace["queries"]), documents=np.asarray(namespace["documents"]),
             similarity=np.asarray(namespace["similarity"]), embeddings=namespace["embeddings"].numpy(),
             module=np.array(type(namespace["model"]).__module__))
    """
)


@pytest.mark.slow  # a fresh-process load
def test_push_command_sends_one_commit_that_loads_from_the_hub_as_the_card_says(folder, tokenizer, hub, tmp_path):
    before = hashes(folder)
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "diffembed_hf.cli", "push", str(folder), "user/tiny-diffembed",
                             "--private"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{hub.url}/user/tiny-diffembed/commit/" in result.stdout

    assert api_calls(hub) == ["create_repo", "tree", "validate_yaml", "preupload", "commit"]
    assert all(r["token"] == TOKEN for r in hub.requests if r["endpoint"] != "agent_harnesses")
    [commit] = hub.commits
    assert (commit.repo_id, commit.revision, commit.create_pr, commit.summary) == (
        "user/tiny-diffembed", "main", False, MESSAGE)
    assert "validated offline with AutoModel and SentenceTransformer" in commit.description
    assert sorted(commit.files) == MODEL_FILES  # no pickle, checkpoint, cache or training record
    assert hub.repos["user/tiny-diffembed"].private
    for path, content in commit.files.items():
        if path != "README.md":
            assert content == (folder / path).read_bytes(), path
    assert sorted(hub.files("user/tiny-diffembed")) == sorted([".gitattributes", *MODEL_FILES])
    assert hashes(folder) == before  # the local folder is untouched (no README written into it)

    card = commit.files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "sentence-transformers" and metadata["pipeline_tag"] == "sentence-similarity"
    assert {"custom_code", "diffembed", "sentence-transformers"} <= set(metadata["tags"])
    assert metadata["base_model"] == "Dream-org/Dream-v0-Instruct-7B"
    assert metadata["datasets"] == ["siyue/ReasonAug"]  # a local file is not a Hub dataset
    assert metadata["license"] == "apache-2.0" and metadata["language"] == ["en"]
    assert "| learning_rate | 0.0001 |" in card and "| lora_target_modules | q_proj, v_proj |" in card
    assert "| ndcg@10 | 0.1234 | 0.4321 |" in card and "held-out 5% of siyue/ReasonAug" in card
    assert "`extra.jsonl` (local)" in card and "/home/someone" not in card
    assert "1 h 02 min" in card and "zhang-etal-2025-diffusion" in card and "2505.15045" in card
    assert card.count("trust_remote_code=True") >= 3

    # Paste the card's code into a fresh process: it downloads the repo from the Hub (HF_ENDPOINT) and embeds.
    snippet = tmp_path / "usage.py"
    snippet.write_text("\n".join(re.findall(r"```python\n(.*?)```", card, re.S)))
    out = tmp_path / "usage.npz"
    subprocess.run([sys.executable, "-c", PASTE, str(snippet), str(out)], env=dict(env, PYTHONPATH=""), check=True,
                   timeout=300, capture_output=True)
    got = np.load(out)
    reference = embed(DiffEmbedForEmbedding.from_pretrained(folder).eval(), tokenizer,
                      [DEFAULT_QUERY_PROMPT + EXAMPLE_QUERY, EXAMPLE_DOCUMENT])
    assert str(got["module"]).startswith("transformers_modules")  # the repo's own remote code ran
    np.testing.assert_allclose(got["embeddings"], reference, atol=1e-5)
    np.testing.assert_allclose(got["queries"][0], reference[0], atol=1e-5)  # encode_query added the prompt
    np.testing.assert_allclose(got["documents"][0], reference[1], atol=1e-5)
    np.testing.assert_allclose(got["similarity"].item(), reference[0] @ reference[1], atol=1e-5)
    resolved = [r["path"] for r in hub.requests if r["endpoint"] == "resolve" and r["method"] == "GET"]
    assert any(p.endswith("/model.safetensors") for p in resolved)  # really downloaded from the fake Hub


def test_pushing_again_sends_only_what_changed(folder, hub, tmp_path):
    local = shutil.copytree(folder, tmp_path / "model")
    first = push(local, "user/again", validate=False)
    second = push(local, "user/again", validate=False)
    assert second.oid == first.oid and len(hub.commits) == 1  # nothing changed: the client makes no commit
    assert api_calls(hub)[-1] == "model_info"  # it answered with the current head instead

    settings = json.loads((local / "config_sentence_transformers.json").read_text())
    settings["prompts"]["query"] = "Given a question, retrieve passages that answer it:\n"
    (local / "config_sentence_transformers.json").write_text(json.dumps(settings))
    third = push(local, "user/again", commit_message="New query prompt", validate=False)
    assert third.oid != first.oid and len(hub.commits) == 2
    commit = hub.commits[-1]
    assert commit.summary == "New query prompt" and not commit.deleted
    assert sorted(commit.files) == ["README.md", "config_sentence_transformers.json"]  # the card shows the prompt
    assert "Given a question, retrieve passages" in commit.files["README.md"].decode()
    stored = hub.files("user/again")
    assert sorted(stored) == sorted([".gitattributes", *MODEL_FILES])  # one copy of each file, nothing else
    assert all(stored[p] == (local / p).read_bytes() for p in MODEL_FILES if p != "README.md")
    snapshot = hub.snapshot("user/again")
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == sorted(stored)


def test_resaving_with_shards_deletes_the_stale_single_file_on_the_hub(folder, tokenizer, hub, tmp_path):
    push(folder, "user/sharded", validate=False)
    model = DiffEmbedForEmbedding.from_pretrained(folder).eval()
    # save_pretrained rewrites these: real files, not links into the shared folder
    sharded = clone(folder, tmp_path / "sharded", skip={"model.safetensors", "config.json", *REMOTE_CODE_FILES})
    model.save_pretrained(sharded, max_shard_size="4MB")
    weights = sorted(p.name for p in sharded.glob("model*.safetensors*"))
    assert "model.safetensors.index.json" in weights and len(weights) > 2
    push(sharded, "user/sharded", validate=False)
    commit = hub.commits[-1]
    assert commit.deleted == ["model.safetensors"]  # else transformers would still load the old file first
    assert set(weights) <= set(commit.files)
    assert "model.safetensors" not in hub.files("user/sharded")
    reloaded = DiffEmbedForEmbedding.from_pretrained(hub.snapshot("user/sharded")).eval()
    texts = ["a sharded checkpoint", "loads the same"]
    np.testing.assert_allclose(embed(reloaded, tokenizer, texts), embed(model, tokenizer, texts), atol=1e-6)


def test_a_failed_commit_is_reported_and_changes_nothing(folder, hub, monkeypatch, capsys):
    before = hashes(folder)
    hub.fail("commit", 500, "storage backend unavailable")
    assert cli_main(["push", str(folder), "user/failing", "--skip-validation"]) == 1  # a failure, not a usage error
    error = capsys.readouterr().err
    assert "failed while committing" in error and "500" in error and "storage backend unavailable" in error
    assert "Nothing was committed" in error
    assert hashes(folder) == before
    assert sorted(hub.files("user/failing")) == [".gitattributes"]  # the repo exists, no file arrived
    assert not hub.commits

    info = push(folder, "user/failing", validate=False)  # the same push again completes it
    assert sorted(hub.files("user/failing")) == sorted([".gitattributes", *MODEL_FILES])
    assert hub.head("user/failing") == info.oid


def test_branch_and_pull_request(folder, hub):
    on_dev = push(folder, "user/revs", revision="dev", validate=False)
    assert [c.revision for c in hub.commits] == ["dev"] and "branch" in api_calls(hub)
    assert hub.head("user/revs", "dev") == on_dev.oid
    assert sorted(hub.files("user/revs")) == [".gitattributes"]  # main is untouched

    pull = push(folder, "user/revs", create_pr=True, validate=False)
    assert pull.pr_num == 1 and pull.pr_url == f"{hub.url}/user/revs/discussions/1"
    assert hub.commits[-1].create_pr and hub.commits[-1].revision == "main"
    assert sorted(hub.files("user/revs", "refs/pr/1")) == sorted([".gitattributes", *MODEL_FILES])
    assert sorted(hub.files("user/revs")) == [".gitattributes"]


def test_token_comes_from_hf_token_then_the_login_cache(folder, hub, tmp_path, monkeypatch):
    token_file = tmp_path / "home" / "token"
    token_file.parent.mkdir()
    token_file.write_text("hf_cache_token\n")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(token_file))
    push(folder, "user/tokens", validate=False)
    assert hub.commits[-1].token == TOKEN  # HF_TOKEN wins over the login cache
    monkeypatch.delenv("HF_TOKEN")
    local = clone(folder, tmp_path / "licensed")
    (local / "LICENSE").write_text("Apache License 2.0\n")  # something new to commit
    push(local, "user/tokens", validate=False)
    assert hub.commits[-1].token == "hf_cache_token" and sorted(hub.commits[-1].files) == ["LICENSE"]


def _broken(folder, tmp_path, problem):
    """A copy of `folder` with one problem."""
    dest = tmp_path / problem
    if problem == "empty":
        dest.mkdir()
        return dest
    skip = {"no-weights": {"model.safetensors"}, "no-code": {"modeling_diffembed.py"},
            "no-modules": {"modules.json"}, "pickle-only": {"model.safetensors"}, "bert": {"config.json"},
            "no-tokenizer": {"tokenizer.json", "tokenizer_config.json"}}[problem]
    clone(folder, dest, skip=skip)
    if problem == "bert":
        config = json.loads((folder / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    if problem == "pickle-only":
        (dest / "pytorch_model.bin").write_bytes(b"pickle")
    return dest


@pytest.mark.parametrize("problem, message", [
    ("empty", "no config.json"),
    ("bert", "model_type='bert'"),
    ("no-weights", "has no weights"),
    ("pickle-only", "only pickled weights"),
    ("no-code", "modeling_diffembed.py"),
    ("no-tokenizer", "no tokenizer"),
    ("no-modules", "no modules.json"),
])
def test_a_folder_that_is_not_a_diffembed_checkpoint_is_refused_before_any_request(folder, hub, tmp_path, problem,
                                                                                    message):
    with pytest.raises(PublishError, match=re.escape(message)):
        push(_broken(folder, tmp_path, problem), "user/broken")
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["user/bad repo", "a/b/c", "user/double--dash", "user/-lead", "", "x" * 97])
def test_an_invalid_repo_id_is_refused_before_any_request(folder, hub, repo_id):
    with pytest.raises(PublishError, match="Invalid repo id"):
        push(folder, repo_id)
    assert hub.requests == []


def test_a_missing_token_is_refused_before_any_request(folder, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "empty-home" / "token"))  # HF_HOME, empty
    assert cli_main(["push", str(folder), "user/no-token"]) == 2
    assert "No Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    assert hub.requests == []


@pytest.mark.slow  # a fresh-process load
def test_dry_run_validates_and_lists_without_sending(folder, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    assert cli_main(["push", str(folder), "user/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Dry run: nothing was sent. 12 files would be pushed to user/dry, validated" in out
    assert [line.split()[0] for line in out.splitlines()[1:]] == MODEL_FILES
    assert "README.md  (generated model card)" in out
    assert hub.requests == []
    assert not (folder / "README.md").exists()


@pytest.mark.slow  # a fresh-process load
def test_a_folder_that_embeds_to_nan_is_refused(folder, hub, tmp_path):
    broken = clone(folder, tmp_path / "nan", skip={"model.safetensors"})
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PublishError, match="not finite"):
        push(broken, "user/nan")
    assert hub.requests == []  # validation runs before any network call


PUSH_TO_HUB = textwrap.dedent(
    """
    import sys
    from diffembed_hf import DiffEmbedForEmbedding
    model = DiffEmbedForEmbedding.from_pretrained(sys.argv[1])
    info = model.push_to_hub("user/from-transformers", commit_message="Upload with transformers", private=True)
    print(info.oid)
    """
)


@pytest.mark.slow  # a fresh-process load
def test_transformers_push_to_hub_uploads_config_code_and_weights(folder, tokenizer, hub, tmp_path):
    # huggingface_hub reads HF_ENDPOINT when it is imported, so transformers' push_to_hub runs in its own process
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", PUSH_TO_HUB, str(folder)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [commit] = hub.commits
    assert commit.summary == "Upload with transformers" and commit.token == TOKEN
    assert result.stdout.split()[-1] == commit.oid and hub.repos["user/from-transformers"].private
    assert sorted(commit.files) == ["README.md", "attention_kernels.py", "config.json", "configuration_diffembed.py",
                                    "model.safetensors", "modeling_diffembed.py"]
    for name in ("configuration_diffembed.py", "modeling_diffembed.py", "attention_kernels.py"):
        assert commit.files[name] == (folder / name).read_bytes()
    assert "auto_map" in json.loads(commit.files["config.json"])
    from transformers import AutoModel

    # (in this process diffembed_hf's registered classes answer AutoModel; the first test loads pushed remote code
    # in a process without diffembed_hf)
    received = AutoModel.from_pretrained(hub.snapshot("user/from-transformers"), trust_remote_code=True).eval()
    texts = ["pushed by transformers", "loads back"]
    np.testing.assert_allclose(embed(received, tokenizer, texts),
                               embed(DiffEmbedForEmbedding.from_pretrained(folder).eval(), tokenizer, texts), atol=1e-6)


@pytest.mark.slow  # a fresh-process load
def test_an_adapter_is_pushed_with_its_hub_base_and_validated(folder, adapter, tokenizer, hub):
    from peft import PeftModel

    before = hashes(adapter)
    with pytest.raises(PublishError, match="--base-model"):  # its base is a local folder
        push(adapter, "user/lora")
    assert hub.requests == []

    push(adapter, "user/lora", base_model="user/tiny-base")  # validated: base folder + adapter, offline
    [commit] = hub.commits
    assert commit.summary == f"Upload DiffEmbed LoRA adapter with diffembed-hf {__version__}"
    assert sorted(commit.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                    "tokenizer.json", "tokenizer_config.json"]
    assert json.loads(commit.files["adapter_config.json"])["base_model_name_or_path"] == "user/tiny-base"
    assert hashes(adapter) == before  # the local adapter_config.json still names the local base
    metadata = yaml.safe_load(commit.files["README.md"].decode().split("---\n")[1])
    assert metadata["library_name"] == "peft" and metadata["base_model"] == "user/tiny-base"
    assert {"peft", "lora", "custom_code", "diffembed"} <= set(metadata["tags"])
    assert 'model.load_adapter("user/lora")' in commit.files["README.md"].decode()

    texts = ["an adapted model", "embeds differently"]
    base = DiffEmbedForEmbedding.from_pretrained(folder).eval()
    received = PeftModel.from_pretrained(DiffEmbedForEmbedding.from_pretrained(folder), hub.snapshot("user/lora"))
    expected = PeftModel.from_pretrained(DiffEmbedForEmbedding.from_pretrained(folder), adapter)
    np.testing.assert_allclose(embed(received.eval(), tokenizer, texts), embed(expected.eval(), tokenizer, texts),
                               atol=1e-6)
    assert not np.allclose(embed(received, tokenizer, texts), embed(base, tokenizer, texts), atol=1e-3)


def test_an_adapter_whose_base_is_not_available_offline_needs_skip_validation(adapter, hub, tmp_path):
    local = clone(adapter, tmp_path / "adapter", skip={"adapter_config.json"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    (local / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/not-cached"}))
    with pytest.raises(PublishError, match="not available offline"):
        push(local, "user/unvalidated")
    assert hub.requests == []
    push(local, "user/unvalidated", validate=False)
    commit = hub.commits[-1]
    assert "not validated before pushing" in commit.description
    assert commit.files["adapter_config.json"] == (local / "adapter_config.json").read_bytes()  # already a Hub id
    assert yaml.safe_load(commit.files["README.md"].decode().split("---\n")[1])["base_model"] == "org/not-cached"


def test_merge_pushes_a_standalone_model(folder, adapter, tokenizer, hub):
    from peft import PeftModel

    push(adapter, "user/merged", merge_adapter=True, validate=False)
    [commit] = hub.commits
    assert sorted(commit.files) == MODEL_FILES and commit.summary == MESSAGE
    card = commit.files["README.md"].decode()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "Dream-org/Dream-v0-Instruct-7B"  # via the base
    assert "| lora_r | 16 |" in card  # the adapter's own training record
    texts = ["merged into", "a standalone model"]
    merged = DiffEmbedForEmbedding.from_pretrained(hub.snapshot("user/merged")).eval()
    expected = PeftModel.from_pretrained(DiffEmbedForEmbedding.from_pretrained(folder), adapter).eval()
    np.testing.assert_allclose(embed(merged, tokenizer, texts), embed(expected, tokenizer, texts), atol=1e-5)


def test_card_of_an_untrained_folder_and_write_card(folder, hub, tmp_path):
    untrained = clone(folder, tmp_path / "untrained", skip={"diffembed_training.json"})
    card = str(build_model_card(untrained, "user/untrained"))
    assert "has **not been fine-tuned with `diffembed train`**" in card and "## Evaluation" not in card
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in metadata and "datasets" not in metadata and "custom_code" in metadata["tags"]
    assert files_to_push(untrained) == [p for p in MODEL_FILES if p != "README.md"]

    paths = push(untrained, "user/untrained", dry_run=True, write_card=True, validate=False)
    assert paths == MODEL_FILES and not (untrained / "README.md").exists()  # a dry run writes nothing, anywhere
    assert hub.requests == []


# ----------------------------------------------------------------------------------------------------------
# The folder's own card (issue 10): never replaced unasked, a dry run writes nothing, the umask
# ----------------------------------------------------------------------------------------------------------

HAND_WRITTEN = "---\nlicense: mit\n---\n\n# My model\n\nWritten by hand over three evenings.\n"


def test_a_hand_written_card_is_pushed_as_it_is_and_never_replaced_unasked(folder, hub, tmp_path, capsys):
    mine = clone(folder, tmp_path / "mine")
    (mine / "README.md").write_text(HAND_WRITTEN, encoding="utf-8")
    before = hashes(mine)
    # --write-card over it: refused before any work or request, even in a dry run
    assert cli_main(["push", str(mine), "user/mine", "--write-card", "--dry-run", "--skip-validation"]) == 2
    error = capsys.readouterr().err
    assert "diffembed push: error:" in error and "hand-written card" in error and "--overwrite-card" in error
    with pytest.raises(PublishError, match="overwrite_card=True"):
        push(mine, "user/mine", write_card=True, validate=False)
    assert hashes(mine) == before and hub.requests == []
    # a plain push sends it unchanged
    push(mine, "user/mine", validate=False)
    assert hub.commits[-1].files["README.md"].decode() == HAND_WRITTEN
    # --overwrite-card with a dry run: lists a generated card, writes nothing
    paths = push(mine, "user/mine", dry_run=True, write_card=True, overwrite_card=True, validate=False)
    assert paths.card_generated and hashes(mine) == before
    # asked for, for real: the generated card replaces it, in the folder and on the Hub
    old = os.umask(0o027)
    try:
        push(mine, "user/mine", write_card=True, overwrite_card=True, validate=False)
    finally:
        os.umask(old)
    card = (mine / "README.md").read_text(encoding="utf-8")
    assert card != HAND_WRITTEN and "zhang-etal-2025-diffusion" in card and "license: mit" in card  # its licence kept
    assert hub.commits[-1].files["README.md"].decode() == card
    assert (mine / "README.md").stat().st_mode & 0o777 == 0o640


def test_a_generated_card_is_regenerated_for_the_repo(folder, hub, tmp_path):
    from diffembed_hf.model_card import build_model_card as build, is_generated_card

    mine = clone(folder, tmp_path / "mine")
    (mine / "README.md").write_text(str(build(mine, "user/old-name")), encoding="utf-8")
    push(mine, "user/new-name", validate=False)
    pushed = hub.commits[-1].files["README.md"].decode()
    assert is_generated_card(pushed) and 'SentenceTransformer("user/new-name"' in pushed
    assert 'SentenceTransformer("user/old-name"' in (mine / "README.md").read_text()  # the folder is untouched


def test_the_card_builder_takes_evaluation_results(folder):
    """How another job adds an 'Evaluation results' section and model-index results: one call."""
    from huggingface_hub import EvalResult

    result = EvalResult(task_type="retrieval", dataset_type="mteb/scifact", dataset_name="SciFact",
                        metric_type="ndcg_at_10", metric_value=0.6789)
    card = str(build_model_card(folder, "user/evaluated", eval_results=[result],
                                extra_sections=["## Evaluation results\n\n| task | nDCG@10 |\n|---|---:|\n"
                                                "| SciFact | 0.6789 |"]))
    metadata = yaml.safe_load(card.split("---\n")[1])
    [entry] = metadata["model-index"]
    assert entry["name"] == "evaluated" and entry["results"][0]["metrics"][0]["value"] == 0.6789
    assert card.index("## Evaluation results") < card.index("## Citation")
    plain = str(build_model_card(folder, "user/evaluated"))
    assert "model-index" not in plain and "## Evaluation results" not in plain  # the control
