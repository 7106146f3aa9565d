"""`diffembed encode -o x.npy` before and after issue 18: the old file mode (sentence-transformers' own
`SentenceTransformer.encode`, batches of 32 texts, padded) against the new one (the packed, length-sorted,
token-budget encoder every mode now shares, `encoding.encode`), on the same folder and texts, in one process.

The folder: a DiffEmbed model of the `cpu_throughput.py` shape (4 layers, hidden 512, 8 q / 2 kv heads, random
weights) with the real Dream tokenizer. The texts: words drawn at random, 16 to 512 tokens each, in random order
(what a user's file holds). Both paths must give the same vectors (checked first); then `--rounds` rounds
alternate the two (so a busy neighbour slows both alike) and the table gives medians and the ratio.

    python benchmarks/encode_file_mode.py            # about 3 minutes on 2 cores
    python benchmarks/encode_file_mode.py --smoke    # smoke test of the script: a 2-layer, 64-wide model, 8 texts
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def build_folder(path: str, args) -> str:
    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding, load_dream_tokenizer
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    torch.manual_seed(0)
    config = DiffEmbedConfig(vocab_size=151667, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, max_position_embeddings=4096, rope_theta=1e6,
                             pad_token_id=151643, bos_token_id=None, eos_token_id=151643)
    model = DiffEmbedForEmbedding(config).eval()
    return str(save_sentence_transformer(model, load_dream_tokenizer(), path, max_seq_length=1024))


def make_texts(args, tokenizer) -> tuple[list[str], int]:
    rng = np.random.default_rng(0)
    words = ("river mountain ledger quartz violin orbit harbor pepper lantern cobalt meadow signal copper "
             "thunder velvet marble cedar falcon").split()
    ids = tokenizer(" ".join(rng.choice(words, size=args.max_len * 2)), verbose=False)["input_ids"]
    lengths = rng.integers(args.min_len, args.max_len + 1, size=args.texts)
    texts = [tokenizer.decode(ids[int(start):int(start) + int(n)]).strip()
             for start, n in zip(rng.integers(0, args.max_len, size=args.texts), lengths)]
    return texts, sum(len(row) for row in tokenizer(texts)["input_ids"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: a tiny model, a few short "
                        "texts, one round (overrides the shape options); no figure is a measurement")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.heads, args.kv_heads = 2, 64, 4, 2
        args.texts, args.min_len, args.max_len, args.rounds = 8, 8, 32, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from diffembed_hf.encoding import encode, load_encoder

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(os.path.join(tmp, "model"), args)
        model = load_encoder(folder, device="cpu")
        texts, tokens = make_texts(args, model.tokenizer)

        def old():  # what `diffembed encode -o x.npy` ran before: sentence-transformers' encode, 32 texts a batch
            return model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)

        def new():
            return encode(model, texts, show_progress_bar=False)

        with torch.inference_mode():
            difference = float(np.abs(old() - new()).max())
            times = {"old": [], "new": []}
            for _ in range(args.rounds):
                for name, run in (("old", old), ("new", new)):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.texts} texts of {args.min_len}-{args.max_len} tokens ({tokens:,} tokens) in random order; model "
          f"{args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads; {args.threads} "
          f"threads, torch {torch.__version__}, {os.cpu_count()} CPUs; medians of {args.rounds} alternating rounds")
    print(f"max |difference| between the two: {difference:.1e}")
    header = f"{'file mode':<58}{'seconds':>9}{'tokens/s':>10}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    print(f"{'before: SentenceTransformer.encode, batch_size 32 (padded)':<58}{medians['old']:>9.2f}"
          f"{tokens / medians['old']:>10,.0f}{1.0:>7.2f}")
    print(f"{'after: packed encoder, 16,384-token batches (no padding)':<58}{medians['new']:>9.2f}"
          f"{tokens / medians['new']:>10,.0f}{medians['old'] / medians['new']:>7.2f}")


if __name__ == "__main__":
    main()
