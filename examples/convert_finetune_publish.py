"""From an upstream diffusion LM to a published embedder, with the library functions behind the CLI.

    python examples/convert_finetune_publish.py Dream-org/Dream-v0-Instruct-7B reasonaug.jsonl me/my-embedder
    python examples/convert_finetune_publish.py --smoke    # the same calls on a tiny random checkpoint (CPU, seconds)

Needs a GPU for a 7B model, the Hub for the download and the upload; `dry_run=True` below stops before
anything is sent. --smoke runs in a temporary folder: a 2-layer random Qwen2 checkpoint with Dream's tokenizer as
the source, the demo's standard-library rows as the data, one training step.
"""

import os
import sys
import tempfile

from diffembed_hf.convert import convert_checkpoint
from diffembed_hf.publish import push
from diffembed_hf.train import TrainingConfig, train


def smoke_inputs() -> tuple[str, str, str, TrainingConfig]:
    """A tiny random Qwen2 checkpoint and the demo's rows, in a temporary folder that becomes the working folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from diffembed_hf import load_dream_tokenizer
    from diffembed_hf.builtin_task import write_task

    os.chdir(tempfile.mkdtemp(prefix="diffembed-example-smoke-"))
    config = Qwen2Config(vocab_size=151667, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    Qwen2ForCausalLM(config).save_pretrained("source")
    load_dream_tokenizer().save_pretrained("source")
    data, _ = write_task("data", max_train=32, max_eval=16)
    return "source", str(data), "me/my-embedder", TrainingConfig(max_steps=1, batch_size=4, max_seq_length=32)


if sys.argv[1:] == ["--smoke"]:
    source, data, repo_id, config = smoke_inputs()
else:
    source, data, repo_id = sys.argv[1:4]
    config = TrainingConfig(max_steps=680, batch_size=4)
converted = convert_checkpoint(source, "./converted")
result = train(str(converted), data, "./finetuned", config)
print("held-out nDCG@10:", result.metrics_before["ndcg@10"], "->", result.metrics_after["ndcg@10"])
print("would upload:", push("./finetuned", repo_id, dry_run=True))
