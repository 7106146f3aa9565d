"""Fixtures and hooks only; the helpers the tests import live in plain modules under tests/helpers/."""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFEMBED_CACHE", tempfile.mkdtemp(prefix="diffembed-test-cache-"))
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.models import TinyFolders, tiny_model  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`-n 2`) each worker is one of the machine's cores: one torch thread here and in every
    # process a test starts, or two workers' OpenMP pools spin against each other and both run many times slower.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

TESTS = Path(__file__).resolve().parent
# Folders whose every test depends on the versions of transformers / sentence-transformers / mteb / huggingface_hub
# (the model against transformers' own, the CLI's output, evaluation, publishing): each test in them, a new module
# included, is marked `versions`, which CI reruns on the oldest versions setup.cfg declares. A module elsewhere
# that depends on them says so with `pytestmark = pytest.mark.versions`.
VERSION_SENSITIVE_FOLDERS = ("cli", "evaluation", "modeling", "publish")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        path = Path(item.path).resolve()
        if path.is_relative_to(TESTS) and path.relative_to(TESTS).parts[0] in VERSION_SENSITIVE_FOLDERS:
            item.add_marker(pytest.mark.versions)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on 2 shared cores, two OpenMP threads whose partner core is busy spin and run
    many times slower (modules that embed many texts use it: `pytestmark = pytest.mark.usefixtures(...)`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """`tiny_folders(**spec)`: the tiny DiffEmbed folder of that spec (helpers.models.save_tiny_folder's arguments;
    the real Dream tokenizer unless tokenizer="words"), built once per session and shared: never change it, take
    `tiny_folders.copy(dest, **spec)`. Checked unchanged when the session ends."""
    folders = TinyFolders(tmp_path_factory.mktemp("tiny-folders"))
    yield folders
    folders.check_unchanged()
