"""From an upstream diffusion LM to a published embedder, with the library functions behind the CLI.

    python examples/convert_finetune_publish.py Dream-org/Dream-v0-Instruct-7B reasonaug.jsonl me/my-embedder

Needs a GPU for a 7B model, the Hub for the download and the upload; `dry_run=True` below stops before
anything is sent.
"""

import sys

from diffembed_hf.convert import convert_checkpoint
from diffembed_hf.publish import push
from diffembed_hf.train import TrainingConfig, train

source, data, repo_id = sys.argv[1:4]
converted = convert_checkpoint(source, "./converted")
result = train(str(converted), data, "./finetuned", TrainingConfig(max_steps=680, batch_size=4))
print("held-out nDCG@10:", result.metrics_before["ndcg@10"], "->", result.metrics_after["ndcg@10"])
print("would upload:", push("./finetuned", repo_id, dry_run=True))
