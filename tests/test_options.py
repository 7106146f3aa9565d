"""One options object per job: a bad value is refused when the object is made, naming the parameter (and, on the
command line, the flag); `from_file` refuses unknown keys; the CLI and the library build the same options from
the same inputs; keywords still work where the docs show them; no public function takes more than ten
parameters."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

import diffembed_hf
from diffembed_hf.cli import build_parser
from diffembed_hf.cli.common import error_message
from diffembed_hf.convert.folder import ConvertOptions
from diffembed_hf.corpus.encode import CorpusOptions
from diffembed_hf.encoding import EncodeOptions
from diffembed_hf.errors import OptionError, UsageError
from diffembed_hf.evaluation.run import EvaluateOptions
from diffembed_hf.publish.upload import PushOptions
from diffembed_hf.reasonaug.pipeline import ReasonAugOptions
from diffembed_hf.validation import (MAX_SEQ_LENGTH, check_fraction, check_max_seq_length, check_non_negative_int,
                                     check_positive_float, check_positive_int, with_overrides)

OPTIONS = (EncodeOptions, CorpusOptions, ConvertOptions, EvaluateOptions, PushOptions, ReasonAugOptions)
REQUIRED = {ReasonAugOptions: {"model": "m"}}  # fields without a default

# (class, field, a bad value, a good value): the good one is the control that the field alone decides
BAD_VALUES = [
    (EncodeOptions, "max_seq_length", 0, 64),
    (EncodeOptions, "max_seq_length", True, 64),  # a bool is no length, though Python counts it an int
    (EncodeOptions, "max_tokens_per_batch", -8, 8),
    (EncodeOptions, "truncate_dim", "64", 64),
    (CorpusOptions, "shard_size", 0, 10),
    (CorpusOptions, "calibration_rows", 1, 2),
    (CorpusOptions, "num_actors", 0, 2),
    (ConvertOptions, "max_seq_length", -1, 512),
    (ConvertOptions, "dtype", "int4", "bfloat16"),
    (EvaluateOptions, "max_tokens_per_batch", 0, 512),
    (EvaluateOptions, "truncate_dim", 2.5, 2),
    (EvaluateOptions, "calibration_rows", 1, 100),
    (ReasonAugOptions, "workers", 0, 1),
    (ReasonAugOptions, "heldout_fraction", 1.0, 0.5),
    (ReasonAugOptions, "seed", -1, 0),
    (ReasonAugOptions, "temperature", 2.5, 2),
    (ReasonAugOptions, "timeout", 0, 0.5),
    (ReasonAugOptions, "model", " ", "m"),
]


@pytest.mark.parametrize("cls, name, bad, good", BAD_VALUES, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_a_bad_value_is_refused_at_construction_naming_the_parameter(cls, name, bad, good):
    values = {**REQUIRED.get(cls, {}), name: good}
    assert getattr(cls(**values), name) == good  # the control: the same field with a good value
    with pytest.raises(OptionError) as refused:
        cls(**{**values, name: bad})
    assert refused.value.option == name and str(refused.value).startswith(f"{name} ")
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, UsageError)


def test_options_that_contradict_each_other_are_refused_at_construction():
    from diffembed_hf.errors import CorpusError, EvaluationError, PublishUsageError

    with pytest.raises(CorpusError, match="device does not apply with Ray"):
        CorpusOptions(ray="auto", device="cpu")
    with pytest.raises(EvaluationError, match="query_prompt=.*applies to --data tasks only"):
        EvaluateOptions(suite="longembed", query_prompt="x")
    with pytest.raises(EvaluationError, match="stdlib_rows=.*applies to --suite stdlib only"):
        EvaluateOptions(suite="longembed", stdlib_rows=10)
    with pytest.raises(PublishUsageError, match="cannot be combined"):
        PushOptions(write_card=True, card="card.md")
    assert EvaluateOptions(suite="stdlib", stdlib_rows=10).stdlib_rows == 10  # the control


def test_secrets_stay_out_of_the_printed_options():
    assert "hf_secret" not in repr(PushOptions(token="hf_secret"))
    assert "sk-secret" not in repr(ReasonAugOptions(model="m", api_key="sk-secret"))


@pytest.mark.parametrize("cls", OPTIONS, ids=lambda c: c.__name__)
def test_from_file_reads_known_fields_and_refuses_unknown_keys(cls, tmp_path):
    name = next(f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**REQUIRED.get(cls, {}), name: True}))
    assert getattr(cls.from_file(good), name) is True
    assert getattr(cls.from_file(good, **{name: False}), name) is False  # a keyword wins over the file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**REQUIRED.get(cls, {}), "max_seq_lenght": 64}))
    with pytest.raises(OptionError, match=r"unknown .* settings \['max_seq_lenght'\]"):
        cls.from_file(bad)


def test_from_file_checks_the_values_as_construction_does(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"shard_size": 0}))
    with pytest.raises(OptionError, match="shard_size must be an integer >= 1, got 0"):
        CorpusOptions.from_file(path)


def _args(argv):
    return build_parser().parse_args(argv)


def test_the_cli_and_the_library_build_the_same_encoding_options(tmp_path):
    from diffembed_hf.cli.encode import corpus_options, encode_options

    args = _args(["encode", "m", "-i", "x.jsonl", "-o", "out.npy", "--max-seq-length", "128", "--truncate-dim",
                  "32", "--dtype", "float16", "--prompt-name", "query", "--overwrite", "--no-progress"])
    assert encode_options(args) == EncodeOptions(max_seq_length=128, truncate_dim=32, dtype="float16",
                                                 prompt_name="query", overwrite=True, show_progress_bar=False)
    assert encode_options(args) != EncodeOptions(max_seq_length=128)  # the control: the comparison can fail
    args = _args(["encode", "m", "-i", "x.jsonl", "-o", "out/", "--shard-size", "100", "--id-field", "pid",
                  "--skip-bad-rows", "--max-tokens-per-batch", "4096"])
    assert corpus_options(args) == CorpusOptions(shard_size=100, id_field="pid", skip_bad_rows=True,
                                                 max_tokens_per_batch=4096)
    # options not given keep the library's defaults, not the parser's None
    defaults = corpus_options(_args(["encode", "m", "-i", "x.jsonl", "-o", "out/"]))
    assert (defaults.field, defaults.shard_size) == ("text", CorpusOptions().shard_size)


def test_the_cli_and_the_library_build_the_same_options_for_the_other_jobs():
    from diffembed_hf.cli.convert import convert_options
    from diffembed_hf.cli.evaluate import evaluate_options
    from diffembed_hf.cli.push import push_options
    from diffembed_hf.cli.reasonaug import reasonaug_options

    args = _args(["convert", "src", "out", "--max-seq-length", "512", "--family", "llada", "--overwrite"])
    assert convert_options(args) == ConvertOptions(max_seq_length=512, family="llada", overwrite=True)
    args = _args(["evaluate", "m", "--suite", "stdlib", "--max-heldout", "50", "--output", "o"])
    assert evaluate_options(args) == EvaluateOptions(suite="stdlib", stdlib_rows=50)
    args = _args(["push", "folder", "me/model", "--dry-run", "--private", "--skip-validation"])
    assert push_options(args) == PushOptions(dry_run=True, private=True, validate=False)
    args = _args(["reasonaug", "c.yaml", "out", "--model", "m", "--workers", "3", "--seed", "7"])
    assert reasonaug_options(args) == ReasonAugOptions(model="m", workers=3, seed=7)


def test_keywords_build_the_options_and_override_a_given_object():
    base = CorpusOptions(shard_size=100, skip_bad_rows=True)
    merged = with_overrides(CorpusOptions, base, {"shard_size": 7})
    assert (merged.shard_size, merged.skip_bad_rows) == (7, True) and base.shard_size == 100
    assert with_overrides(CorpusOptions, None, {"shard_size": 7}) == CorpusOptions(shard_size=7)
    with pytest.raises(TypeError, match="'shard_sise'"):
        with_overrides(CorpusOptions, None, {"shard_sise": 7})
    with pytest.raises(TypeError, match="must be a CorpusOptions"):
        with_overrides(CorpusOptions, EncodeOptions(), {})


def test_a_misspelt_keyword_is_refused_before_any_work(tmp_path):
    from diffembed_hf import encode_corpus

    with pytest.raises(TypeError, match="'shard_sise'"):
        encode_corpus("no-such-model", tmp_path / "c.jsonl", tmp_path / "out", shard_sise=10)
    assert not (tmp_path / "out").exists()


def test_the_shared_checks():
    for check in (check_positive_int, check_non_negative_int, check_positive_float, check_fraction):
        check("x", None, optional=True)  # None: automatic
        with pytest.raises(OptionError, match="^x must be"):
            check("x", None)
        with pytest.raises(OptionError, match="^x must be"):
            check("x", True)  # never a count or a share
    check_positive_int("x", 1)
    with pytest.raises(OptionError, match="integer >= 1, got 0"):
        check_positive_int("x", 0)
    check_non_negative_int("x", 0)
    check_positive_float("x", 1e-9)
    with pytest.raises(OptionError, match="number > 0"):
        check_positive_float("x", float("inf"))
    check_fraction("x", 0.0)
    with pytest.raises(OptionError, match=r"number in \[0, 1\)"):
        check_fraction("x", 1)
    check_max_seq_length(512, 512)
    with pytest.raises(OptionError, match=r"max_seq_length 513 exceeds the model's max_position_embeddings \(512\)"):
        check_max_seq_length(513, 512)
    assert MAX_SEQ_LENGTH == 4096  # the study's length (DiffEmbed paper), the one name for it


def test_the_cli_names_the_flag_of_a_parameter():
    assert error_message(OptionError("max_seq_length", "must be an integer >= 1, got 0")) == \
        "--max-seq-length must be an integer >= 1, got 0"
    assert error_message(OptionError("stdlib_rows", "must be an integer >= 1, got 0")).startswith("--max-heldout ")
    assert error_message(UsageError("no flag here")) == "no flag here"  # other errors as they are
    # another option the problem names: by its parameter in the library, by its flag on the command line
    both = OptionError("warmup_ratio", "and {warmup_steps} were both given: give one", ("warmup_steps",))
    assert str(both) == "warmup_ratio and warmup_steps were both given: give one"
    assert error_message(both) == "--warmup-ratio and --warmup-steps were both given: give one"
    # a training setting that only a --config file sets has no flag: the message says where it is set
    assert error_message(OptionError("lora_alpha", "must be a number > 0, got 0")) == \
        "lora_alpha (a --config setting) must be a number > 0, got 0"


@pytest.mark.parametrize("name", ["encode_file", "encode_corpus", "convert_checkpoint", "push",
                                  "generate_reasonaug", "load_encoder", "encode", "export_vllm", "embed_texts"])
def test_no_public_function_takes_more_than_ten_parameters(name):
    from diffembed_hf.evaluation.run import evaluate

    for function in (getattr(diffembed_hf, name), evaluate):
        named = [p for p in inspect.signature(function).parameters.values() if p.kind != p.VAR_KEYWORD]
        assert len(named) <= 10, (function.__name__, len(named))
