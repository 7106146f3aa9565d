"""Training rows of the four ReasonAug kinds, with BM25 hard negatives from other concepts of the same domain.

- p2i: a problem -> its concept (the definition, or only the concept's name, half of the time each); negatives
  are the best-ranked definitions of other concepts, and a concept never serves twice as a p2i negative for the
  same concept (`p2i_negatives` rows per problem, as long as unused concepts remain).
- i2ps: a concept's name -> one of its problems' solutions (coding) or problem + solution (other types);
  negatives are the solutions that rank best against the concept's definition, one concept each.
- p2ps / ps2ps: a problem (ps2ps: with its solution, or with its concept's name) -> another problem of the same
  concept; negatives are the best-ranked problems of other concepts, each used once per concept and once per
  query. Up to `max_pairs` ordered pairs per concept, a quarter of them ps2ps.

Only the training concepts are ranked (held-out concepts never reach train.jsonl). A row needs one hard negative
(`diffembed train` reads the same number of negatives on every row): a row for which none is left is not made,
and counted. Every random choice comes from a generator seeded by (seed, domain, concept).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from itertools import permutations

from .concepts import Domain
from .negatives import BM25Ranking
from .prompts import Prompts

COLUMNS = ("id", "domain", "instance", "task_type", "task", "user_query", "positive_document",
           "hard_negative_document", "negative_instance")


@dataclass(frozen=True)
class ConceptData:
    """What the model wrote for one concept that survived the checks: its definition (None if it failed) and
    its checked, de-duplicated (problem, solution) pairs."""

    domain: Domain
    name: str
    definition: str | None
    pairs: tuple[tuple[str, str], ...]

    def document(self, pair: tuple[str, str]) -> str:
        """A problem as a document: the solution alone for coding (code is what LeetCode-style retrieval finds),
        problem and solution for every other question type."""
        return pair[1] if self.domain.coding else pair[0] + "\n" + pair[1]


def _rng(seed: int, item: ConceptData, part: str) -> random.Random:
    return random.Random(f"{seed}|{part}|{item.domain.name}|{item.name}")


class RowBuilder:
    """Indexes the training concepts' definitions, problems and solutions once, then makes each concept's rows."""

    def __init__(self, items: list[ConceptData], prompts: Prompts, *, seed: int = 0, max_pairs: int = 20,
                 p2i_negatives: int = 2):
        self.items, self.prompts, self.seed = items, prompts, seed
        self.max_pairs, self.p2i_negatives = max_pairs, p2i_negatives
        self.defined = [item for item in items if item.definition is not None]
        self.definition_ranking = BM25Ranking([f"{item.name}\n{item.definition}" for item in self.defined])
        self.problem_owner = [(item, pair) for item in items for pair in item.pairs]
        self.problem_ranking = BM25Ranking([pair[0] for _, pair in self.problem_owner])
        self.solution_ranking = BM25Ranking([pair[1] for _, pair in self.problem_owner])
        self.no_negative: Counter = Counter()

    @staticmethod
    def _other(candidate: ConceptData, item: ConceptData) -> bool:
        """A candidate negative: another concept of the same domain."""
        return candidate.name != item.name and candidate.domain.name == item.domain.name

    def _row(self, kind: str, item: ConceptData, query: str, positive: str, negative: str, negative_name: str):
        return {"domain": item.domain.name, "instance": item.name, "task_type": kind,
                "task": self.prompts.instruction(kind, item.domain), "user_query": query,
                "positive_document": positive, "hard_negative_document": negative, "negative_instance": negative_name}

    def p2i(self, item: ConceptData) -> list[dict]:
        if item.definition is None:
            return []
        rng, used, rows = _rng(self.seed, item, "p2i"), set(), []
        for problem, _ in item.pairs:
            chosen = []
            for index in self.definition_ranking.rank(problem):
                candidate = self.defined[index]
                if self._other(candidate, item) and candidate.name not in used:
                    chosen.append(candidate)
                    used.add(candidate.name)
                    if len(chosen) == self.p2i_negatives:
                        break
            if not chosen:
                self.no_negative["p2i"] += 1
            for negative in chosen:
                if rng.random() < 0.5:
                    rows.append(self._row("p2i", item, problem, item.definition, negative.definition, negative.name))
                else:
                    rows.append(self._row("p2i", item, problem, item.name, negative.name, negative.name))
        return rows

    def i2ps(self, item: ConceptData) -> list[dict]:
        if item.definition is None or not item.pairs:
            return []
        rng, negatives, names = _rng(self.seed, item, "i2ps"), [], set()
        for index in self.solution_ranking.rank(item.definition):
            owner, pair = self.problem_owner[index]
            if self._other(owner, item) and owner.name not in names:
                negatives.append((owner, pair))
                names.add(owner.name)
                if len(negatives) == len(item.pairs):
                    break
        positives = list(item.pairs)
        rng.shuffle(positives)
        self.no_negative["i2ps"] += len(positives) - len(negatives)
        return [self._row("i2ps", item, item.name, item.document(positive), owner.document(pair), owner.name)
                for positive, (owner, pair) in zip(positives, negatives)]

    def problem_pairs(self, item: ConceptData) -> list[dict]:
        """p2ps and ps2ps rows."""
        if len(item.pairs) < 2:
            return []
        used_problems: set[str] = set()
        negatives: list[list[tuple[ConceptData, tuple[str, str]]]] = []
        for problem, _ in item.pairs:
            chosen, names = [], set()
            for index in self.problem_ranking.rank(problem):
                owner, pair = self.problem_owner[index]
                if self._other(owner, item) and owner.name not in names and pair[0] not in used_problems:
                    chosen.append((owner, pair))
                    names.add(owner.name)
                    used_problems.add(pair[0])
                    if len(chosen) == len(item.pairs) - 1:
                        break
            negatives.append(chosen)
        rng = _rng(self.seed, item, "pairs")
        ordered = list(permutations(range(len(item.pairs)), 2))
        rows = []
        for query_index, positive_index in rng.sample(ordered, min(len(ordered), self.max_pairs)):
            kind = "p2ps" if rng.random() < 0.75 else "ps2ps"
            problem, solution = item.pairs[query_index]
            query = problem if kind == "p2ps" else problem + "\n" + (solution if rng.random() < 0.6 else item.name)
            if not negatives[query_index]:
                self.no_negative[kind] += 1
                continue
            owner, pair = negatives[query_index].pop(0)
            rows.append(self._row(kind, item, query, item.document(item.pairs[positive_index]),
                                  owner.document(pair), owner.name))
        return rows

    def build(self) -> list[dict]:
        """Every concept's rows (p2i, i2ps, then p2ps / ps2ps), concepts in file order, numbered from 1."""
        rows = []
        for item in self.items:
            rows += self.p2i(item) + self.i2ps(item) + self.problem_pairs(item)
        return [{"id": str(number), **row} for number, row in enumerate(rows, 1)]
