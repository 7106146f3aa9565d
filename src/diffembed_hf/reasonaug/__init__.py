"""ReasonAug for your own domain: reasoning-retrieval training data from any OpenAI-compatible chat server.

The DiffEmbed study's second contribution (ReasonAug): an LLM defines each concept of a concepts file, writes
problems that need the concept without naming it, and judges its own solutions; BM25 picks hard negatives among the
other concepts of the same domain; the rows are the columns `diffembed train` reads. `generate_reasonaug` (and
`diffembed reasonaug`) runs it resumably: every answer is journaled as it arrives and a rerun sends only what is
missing. Needs the `[reasonaug]` extra (the `openai` client and `bm25s`).

The names below load on first access, so that the command line's parser stays light.
"""

from __future__ import annotations

_EXPORTS = {
    "ConceptSet": "concepts", "ConceptsError": "concepts", "Domain": "concepts", "load_concepts": "concepts",
    "Prompts": "prompts", "PromptsError": "prompts", "load_prompts": "prompts",
    "ReasonAugOptions": "pipeline", "ReasonAugResult": "pipeline", "generate_reasonaug": "pipeline",
    "Settings": "planner",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
