"""The study's benchmark suites as mteb 2.x task names, with its per-task instructions and published numbers.

Facts from the DiffEmbed study (arXiv:2505.15045 v1, tables for DiffEmbed = Dream 7B, bidirectional, mean
pooled) and its public evaluation script, checked against both. Nothing here imports
mteb: names are checked against mteb's registry in `run`, and the model card reads the numbers without it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..errors import EvaluationError

STUDY = "DiffEmbed (Dream 7B), arXiv:2505.15045 v1"
STUDY_URL = "https://arxiv.org/abs/2505.15045"

# mteb task types whose inputs are all alike (no query/document sides): the instruction goes on every input.
SYMMETRIC_TYPES = frozenset({"STS", "Clustering", "Classification", "PairClassification",
                             "MultilabelClassification"})

# The study's own instructions (as written there, the AoPS typo included). Every other suite task uses mteb's
# default prompt for the task, which is LLM2Vec's instruction for the 15 MTEB tasks (docs/design/evaluation.md).
STUDY_INSTRUCTIONS = {
    "BrightTheoremQATheoremsRetrieval":
        "Given a problem, retrieve the relevant theorems that help solve the given problem:",
    "BrightTheoremQAQuestionsRetrieval":
        "Given a problem, retrieve the relevant problems that can be solved by the similar theorems:",
    "BrightAopsRetrieval":
        "Given a problem, rretrieve the relevant problems that can be solved by the similar math theorems:",
    "BrightLeetcodeRetrieval": "Given a coding problem, retrieve the relevant problems that can be solved by the "
                               "similar algorithms or data structures:",
    "SICK-R": "Retrieve semantically similar text:",
    "STS17": "Retrieve semantically similar text:",
    "STSBenchmark": "Retrieve semantically similar text:",
}

LEMB_SHORT = ("test_256", "test_512", "test_1024", "test_2048", "test_4096")
LEMB_LONG = ("test_8192", "test_16384", "test_32768")


@dataclass(frozen=True)
class Published:
    """One number the study reports, in percent: `metric` is mteb's score key ("og.map_at_1000" reads the
    `og` block of a FollowIR result), averaged over `splits` when given."""

    label: str
    metric: str
    value: float
    splits: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SuiteTask:
    name: str
    hf_subsets: tuple[str, ...] | None = None  # English-only selections (MassiveIntent, STS17)
    eval_splits: tuple[str, ...] | None = None
    published: tuple[Published, ...] = field(default_factory=tuple)


def _main(name: str, metric: str, value: float, label: str | None = None) -> SuiteTask:
    return SuiteTask(name, published=(Published(label or metric, metric, value),))


BRIGHT = (
    _main("BrightTheoremQATheoremsRetrieval", "ndcg_at_10", 38.9),
    _main("BrightTheoremQAQuestionsRetrieval", "ndcg_at_10", 48.3),
    _main("BrightAopsRetrieval", "ndcg_at_10", 15.4),
    _main("BrightLeetcodeRetrieval", "ndcg_at_10", 30.0),
)
BRIGHT_OTHER_DOMAINS = tuple(SuiteTask(f"Bright{d}Retrieval") for d in (
    "Biology", "EarthScience", "Economics", "Psychology", "Robotics", "Stackoverflow", "SustainableLiving", "Pony"))
LONGEMBED = (
    SuiteTask("LEMBPasskeyRetrieval", published=(Published("Acc@1 <=4k", "ndcg_at_1", 100.0, LEMB_SHORT),
                                                  Published("Acc@1 >4k", "ndcg_at_1", 29.3, LEMB_LONG))),
    SuiteTask("LEMBNeedleRetrieval", published=(Published("Acc@1 <=4k", "ndcg_at_1", 86.8, LEMB_SHORT),
                                                 Published("Acc@1 >4k", "ndcg_at_1", 20.0, LEMB_LONG))),
    _main("LEMBNarrativeQARetrieval", "ndcg_at_10", 42.1),
    _main("LEMBQMSumRetrieval", "ndcg_at_10", 43.8),
    _main("LEMBSummScreenFDRetrieval", "ndcg_at_10", 98.0),
    _main("LEMBWikimQARetrieval", "ndcg_at_10", 77.2),
)
FOLLOWIR = (
    SuiteTask("Robust04InstructionRetrieval", published=(Published("MAP@1000", "og.map_at_1000", 18.9),
                                                          Published("p-MRR", "p-MRR", 5.7))),
    SuiteTask("News21InstructionRetrieval", published=(Published("nDCG@5", "og.ndcg_at_5", 27.7),
                                                        Published("p-MRR", "p-MRR", 3.6))),
    SuiteTask("Core17InstructionRetrieval", published=(Published("MAP@1000", "og.map_at_1000", 16.2),
                                                        Published("p-MRR", "p-MRR", 6.0))),
)
MTEB15 = (
    _main("ArguAna", "ndcg_at_10", 58.47),
    _main("NFCorpus", "ndcg_at_10", 35.44),
    _main("SciFact", "ndcg_at_10", 71.42),
    _main("SciDocsRR", "map_at_1000", 82.00),
    _main("StackOverflowDupQuestions", "map_at_1000", 50.69),
    _main("Banking77Classification", "accuracy", 87.50),
    _main("EmotionClassification", "accuracy", 51.44),
    SuiteTask("MassiveIntentClassification", hf_subsets=("en",), eval_splits=("test",),
              published=(Published("accuracy", "accuracy", 75.64),)),
    _main("BiorxivClusteringS2S", "v_measure", 35.56),
    _main("MedrxivClusteringS2S", "v_measure", 31.42),
    _main("TwentyNewsgroupsClustering", "v_measure", 52.56),
    _main("SICK-R", "cosine_spearman", 76.49),
    SuiteTask("STS17", hf_subsets=("en-en",), published=(Published("cosine_spearman", "cosine_spearman", 87.83),)),
    _main("STSBenchmark", "cosine_spearman", 83.43),
    _main("SprintDuplicateQuestions", "max_ap", 95.30),
)

SUITES: dict[str, tuple[SuiteTask, ...]] = {
    "bright": BRIGHT,
    "bright-all": BRIGHT + BRIGHT_OTHER_DOMAINS,
    "longembed": LONGEMBED,
    "followir": FOLLOWIR,
    "mteb15": MTEB15,
}
LOCAL_SUITES = ("stdlib",)  # built in, offline (see `local.stdlib_task`)

# The study's input lengths, used unless --max-seq-length says otherwise (None: the model's own setting).
SUITE_MAX_SEQ_LENGTH = {"longembed": 4096, "followir": 304, "stdlib": 128}

PUBLISHED = {task.name: task.published for tasks in SUITES.values() for task in tasks if task.published}


def suite_names() -> list[str]:
    return [*SUITES, *LOCAL_SUITES]


def close_matches(name: str, candidates: list[str]) -> str:
    """' (did you mean: a, b?)' or '' ; case-insensitive."""
    lowered = {c.lower(): c for c in candidates}
    found = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)]
    return f" (did you mean: {', '.join(found)}?)" if found else ""


def suite_tasks(name: str) -> tuple[SuiteTask, ...]:
    if name not in SUITES:
        raise EvaluationError(f"unknown suite {name!r}{close_matches(name, suite_names())}; "
                              f"suites: {', '.join(suite_names())}")
    return SUITES[name]


def suite_task(name: str) -> SuiteTask:
    """The suite's selection for a task named on its own (English subsets for MassiveIntent / STS17)."""
    for tasks in SUITES.values():
        for task in tasks:
            if task.name == name:
                return task
    return SuiteTask(name)


def render_prompt(instruction: str | None) -> str:
    """An instruction as the text put before the input (`sentence_transformer.instruction_prompt`, the one rule)."""
    from ..sentence_transformer import instruction_prompt

    return instruction_prompt(instruction)
