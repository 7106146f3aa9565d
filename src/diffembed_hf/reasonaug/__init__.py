"""ReasonAug for your own domain: reasoning-retrieval training data from any OpenAI-compatible chat server.

The DiffEmbed study's second contribution (ReasonAug): an LLM defines each concept of a concepts file, writes
problems that need the concept without naming it, and judges its own solutions; BM25 picks hard negatives among the
other concepts of the same domain; the rows are the columns `diffembed train` reads. `generate_reasonaug` (and
`diffembed reasonaug`) runs it resumably: every answer is journaled as it arrives and a rerun sends only what is
missing. Needs the `[reasonaug]` extra (the `openai` client and `bm25s`).
"""

from __future__ import annotations

from .concepts import ConceptsError, ConceptSet, Domain, load_concepts
from .pipeline import ReasonAugResult, Settings, generate_reasonaug
from .prompts import Prompts, PromptsError, load_prompts

__all__ = [
    "ConceptSet",
    "ConceptsError",
    "Domain",
    "Prompts",
    "PromptsError",
    "ReasonAugResult",
    "Settings",
    "generate_reasonaug",
    "load_concepts",
    "load_prompts",
]
