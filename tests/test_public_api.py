"""The import paths users write: every entry point importable from `diffembed_hf` itself, the same object as in
its module, and importing the package (what `diffembed --help` does) still loads neither torch nor transformers."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import diffembed_hf

# name -> the module a user could also import it from (what the docs' reference pages name)
ENTRY_POINTS = {
    "load_encoder": "diffembed_hf.encoding",
    "open_model_folder": "diffembed_hf.model_folder",
    "ModelFolder": "diffembed_hf.model_folder",
    "encode": "diffembed_hf.encoding",
    "encode_file": "diffembed_hf.encoding",
    "save_sentence_transformer": "diffembed_hf.sentence_transformer",
    "convert_checkpoint": "diffembed_hf.convert.folder",
    "TrainingConfig": "diffembed_hf.train",
    "encode_corpus": "diffembed_hf.corpus.encode",
    "embed_texts": "diffembed_hf.corpus.embed",
    "push": "diffembed_hf.publish.upload",
    "export_vllm": "diffembed_hf.export",
    "generate_reasonaug": "diffembed_hf.reasonaug.pipeline",
    "load_dream_tokenizer": "diffembed_hf.tokenization",
    "EncodeOptions": "diffembed_hf.encoding",
    "CorpusOptions": "diffembed_hf.corpus.encode",
    "ConvertOptions": "diffembed_hf.convert.folder",
    "EvaluateOptions": "diffembed_hf.evaluation.run",
    "PushOptions": "diffembed_hf.publish.upload",
    "ReasonAugOptions": "diffembed_hf.reasonaug.pipeline",
    "DiffEmbedConfig": "diffembed_hf.modeling.configuration_diffembed",
    "DiffEmbedModel": "diffembed_hf.modeling.modeling_diffembed",
    "DiffEmbedForEmbedding": "diffembed_hf.modeling.modeling_diffembed",
    "DiffEmbedPreTrainedModel": "diffembed_hf.modeling.modeling_diffembed",
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_is_the_object_of_its_module(name):
    namespace: dict = {}
    exec(f"from diffembed_hf import {name}", namespace)  # the statement a user writes
    assert namespace[name] is getattr(importlib.import_module(ENTRY_POINTS[name]), name)
    assert name in diffembed_hf.__all__


def test_evaluate_is_the_lazy_wrapper_over_the_mteb_runner():
    from diffembed_hf import evaluate
    from diffembed_hf.evaluation import evaluate as package_evaluate

    assert evaluate is package_evaluate  # callable without mteb imported until it runs


def test_training_function_lives_in_the_train_module():
    import diffembed_hf.train

    assert callable(diffembed_hf.train.train) and diffembed_hf.train.TrainingConfig is diffembed_hf.TrainingConfig


def test_every_name_in_all_resolves():
    for name in diffembed_hf.__all__:
        assert getattr(diffembed_hf, name) is not None, name


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_encoders'"):
        diffembed_hf.load_encoders  # noqa: B018


def test_importing_the_package_and_the_parser_stays_light():
    code = ("import sys, diffembed_hf; from diffembed_hf.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # control: asking for an entry point does load its dependencies, so the check above can fail
    code = "import sys; from diffembed_hf import load_encoder; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
