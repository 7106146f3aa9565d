"""`diffembed train --matryoshka-dims`: sentence-transformers' MatryoshkaLoss around the recipe's loss (plain and
GradCache), its value against an independent computation of the objective, and what the run records."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from test_compact import ST_VERSION
from test_train import FAST, base, task  # noqa: F401

from diffembed_hf.cli import main
from diffembed_hf.train import ConfigError, TrainingConfig, _make_loss, auto_matryoshka_dims, train

TRAINING_RECORD = "diffembed_training.json"  # written by `diffembed train` into the model folder

pytestmark = pytest.mark.versions  # CI reruns it on the oldest transformers / sentence-transformers

QUERIES = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota", "kappa lambda"]
POSITIVES = ["gamma beta alpha words", "epsilon and delta", "iota theta eta zeta", "lambda kappa mu"]
NEGATIVES = ["beta only", "delta only", "zeta only", "kappa only"]


def features(model, texts):
    return model.tokenize(texts)


def independent_loss(model, dims, scale=50.0):
    """InfoNCE over cosine x scale, in-batch and hard negatives, summed over the leading `dims` (weights 1)."""
    with torch.no_grad():
        q, p, n = (model.encode(texts, convert_to_tensor=True) for texts in (QUERIES, POSITIVES, NEGATIVES))
    total = 0.0
    for d in dims:
        docs = torch.cat([p[:, :d], n[:, :d]])
        scores = F.normalize(q[:, :d], dim=-1) @ F.normalize(docs, dim=-1).T * scale
        total += F.cross_entropy(scores, torch.arange(len(QUERIES))).item()
    return total


@pytest.mark.parametrize("gradcache", [None, 2], ids=["plain", "gradcache"])
def test_matryoshka_loss_is_the_recipe_loss_summed_over_the_leading_dimensions(base, gradcache):  # noqa: F811
    model = SentenceTransformer(base, trust_remote_code=True, device="cpu")
    config = TrainingConfig(matryoshka_dims=[64, 32, 16], gradcache_mini_batch_size=gradcache)
    loss = _make_loss(model, config)
    assert type(loss).__name__ == "MatryoshkaLoss" and list(loss.matryoshka_dims) == [64, 32, 16]
    inner = "CachedMultipleNegativesRankingLoss" if gradcache else "MultipleNegativesRankingLoss"
    assert type(loss.loss).__name__ == inner
    batch = [features(model, texts) for texts in (QUERIES, POSITIVES, NEGATIVES)]
    value = loss(batch, None).item()
    assert value == pytest.approx(independent_loss(model, [64, 32, 16]), rel=1e-4)
    plain = _make_loss(model, TrainingConfig(gradcache_mini_batch_size=gradcache))(batch, None).item()
    assert plain == pytest.approx(independent_loss(model, [64]), rel=1e-4)  # control: the full width alone
    assert value > plain * 1.5


def test_auto_dims_halve_the_width_down_to_64():
    assert auto_matryoshka_dims(3584) == [3584, 1792, 896, 448, 224, 112]
    assert auto_matryoshka_dims(4096) == [4096, 2048, 1024, 512, 256, 128, 64]
    assert auto_matryoshka_dims(64) == [64]


def test_cli_run_records_the_dims_stores_truncate_dim_and_cards_them(base, task, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "mrl"
    argv = ["train", base, task[0], str(out), "--max-steps", "4", "--batch-size", "16", "--max-seq-length", "64",
            "--full", "--eval-fraction", "0", "--device", "cpu", "--matryoshka-dims", "64,16,32",
            "--truncate-dim", "32"]
    assert main(argv) == 0
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["hyperparameters"]["matryoshka_dims"] == [64, 32, 16]  # sorted, largest first
    assert json.loads((out / "config_sentence_transformers.json").read_text())["truncate_dim"] == 32
    card = (out / "README.md").read_text()
    assert "### Matryoshka dimensions" in card and "truncate_dim=16" in card and "stores `truncate_dim=32`" in card
    if ST_VERSION >= (5, 4):  # sentence-transformers reads the stored truncate_dim since 5.4
        assert SentenceTransformer(str(out), trust_remote_code=True, device="cpu").encode(["x"]).shape[-1] == 32

    capsys.readouterr()
    assert main(["train", base, task[0], str(tmp_path / "wide"), "--max-steps", "2", "--full", "--device", "cpu",
                 "--max-seq-length", "64", "--matryoshka-dims", "128,64"]) == 2
    assert "--matryoshka-dims 128 is larger than the model's embedding dimension 64" in capsys.readouterr().err
    assert not (tmp_path / "wide").exists()
    with pytest.raises(ConfigError, match="integers"):
        TrainingConfig(matryoshka_dims="64,abc")


def test_bare_flag_trains_the_auto_dims(base, task, tmp_path):  # noqa: F811
    result = train(base, task[0], tmp_path / "auto", TrainingConfig(max_steps=2, lora=False, eval_fraction=0.0,
                                                                      matryoshka_dims="auto", **FAST))
    record = json.loads((result.output_dir / TRAINING_RECORD).read_text())
    assert record["hyperparameters"]["matryoshka_dims"] == [64]
