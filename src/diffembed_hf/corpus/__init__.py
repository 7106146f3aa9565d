"""Embedding corpora: in memory (`embed_texts`), or of any size into parquet shards (`encode_corpus`), on one
process, every rank of a torchrun job, or a Ray cluster (`ray_data`, extra `[ray]`)."""

from ..packed_encoder import DEFAULT_MAX_TOKENS_PER_BATCH, PackedEncoder
from ..errors import CorpusError
from .embed import embed_texts, visible_devices
from .encode import DEFAULT_SHARD_SIZE, CorpusOptions, CorpusResult, encode_corpus
from .read import CorpusSource, iter_rows, join_title


def __getattr__(name: str):
    # Ray is an optional extra: imported only when asked for
    if name == "embed_dataset":
        from . import ray_data

        return getattr(ray_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_TOKENS_PER_BATCH",
    "DEFAULT_SHARD_SIZE",
    "CorpusError",
    "CorpusOptions",
    "CorpusResult",
    "CorpusSource",
    "PackedEncoder",
    "embed_dataset",
    "embed_texts",
    "encode_corpus",
    "iter_rows",
    "join_title",
    "visible_devices",
]
