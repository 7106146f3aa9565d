"""The plan of a ReasonAug run: a pure function of (concepts, prompts, settings, journal answers).

For each concept a definition request, and `problems_per_concept` problem requests; for each usable problem a
checker request. An unusable answer (empty, refused, cut off, without its sections, or a problem that names its
concept) is asked again with a new sampling seed, up to `answer_retries` times, then dropped. Every request's
sampling seed, topic and reference come from `seed`, so the same settings always make the same requests (and the
same journal keys).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .answers import RETRYABLE, parse_definition, parse_problem
from .checker import verdict
from .concepts import ConceptSet, Domain
from .journal import request_key
from .prompts import Prompts

RETRYABLE_CHECK = RETRYABLE - {"missing_sections", "names_concept"}  # a checker answer is a verdict or nothing


@dataclass(frozen=True)
class Settings:
    """What decides the requests and the rows (a run's identity, with the prompts and the concepts)."""

    model: str
    problems_per_concept: int = 8
    seed: int = 0
    temperature: float = 1.0
    check_temperature: float = 0.0
    max_tokens: int = 4000
    answer_retries: int = 1
    heldout_fraction: float = 0.1
    max_pairs: int = 20
    p2i_negatives: int = 2


@dataclass(frozen=True)
class Request:
    key: str
    stage: str
    item: str  # for people reading the journal: "problem | algorithm | Binary Search | #3 | try 0"
    body: dict


def derived_seed(*parts) -> int:
    """A 31-bit seed from the run's seed and the names of what it is for."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) % 2**31


@dataclass
class Plan:
    """What the journal's answers make of the concepts: the requests still to send, and everything usable."""

    pending: list[Request] = field(default_factory=list)
    definitions: dict[str, str] = field(default_factory=dict)
    pairs: dict[str, list[tuple[int, str, str]]] = field(default_factory=lambda: defaultdict(list))
    unusable: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # every unusable answer
    dropped: list[dict] = field(default_factory=list)  # what never made it, and why
    used: set[str] = field(default_factory=set)  # journal keys this run reads

    def drop(self, stage: str, domain: Domain, concept: str, index: int | None, reason: str, content=None) -> None:
        self.dropped.append({"stage": stage, "domain": domain.name, "concept": concept, "index": index,
                             "reason": reason, "answer": content})


class Planner:
    def __init__(self, concepts: ConceptSet, prompts: Prompts, settings: Settings):
        self.concepts, self.prompts, self.settings = concepts, prompts, settings

    def request(self, stage: str, domain: Domain, concept: str, index: int | None, attempt: int, messages,
                temperature: float) -> Request:
        s = self.settings
        body = {**self.prompts.request_fields(stage), "model": s.model, "messages": messages,
                "temperature": temperature, "max_completion_tokens": s.max_tokens,
                "seed": derived_seed(s.seed, stage, domain.name, concept, index, attempt)}
        item = " | ".join([stage, domain.name, concept] + ([f"#{index}"] if index is not None else [])
                          + [f"try {attempt}"])
        return Request(request_key(body), stage, item, body)

    def problem_messages(self, domain: Domain, concept: str, index: int):
        rng = random.Random(derived_seed(self.settings.seed, "topic", domain.name, concept, index))
        topic, reference = rng.choice(self.prompts.topics(domain)), rng.choice(self.prompts.references(domain))
        return self.prompts.messages("problem", domain, concept=concept, topic=topic, reference=reference)

    def _ask(self, plan: Plan, answers: dict, make, parse, retryable: set, on_drop) -> tuple[str, ...] | None:
        """Walk one request's attempts: the parsed sections of the first usable answer, or None (pending or
        dropped: `on_drop(reason, content)`)."""
        for attempt in range(self.settings.answer_retries + 1):
            request = make(attempt)
            record = answers.get(request.key)
            if record is None:
                plan.pending.append(request)
                return None
            plan.used.add(request.key)
            parsed = parse(record["answer"])
            if parsed.failure is None:
                return parsed.sections
            plan.unusable[request.stage][parsed.failure] += 1
            if parsed.failure not in retryable or attempt == self.settings.answer_retries:
                on_drop(parsed.failure, record["answer"].get("content"))
                return None
        return None

    def plan(self, answers: dict) -> Plan:
        plan, s = Plan(), self.settings
        for domain, concept in self.concepts.concepts:
            messages = self.prompts.messages("definition", domain, concept=concept)
            sections = self._ask(
                plan, answers,
                lambda attempt: self.request("definition", domain, concept, None, attempt, messages, s.temperature),
                parse_definition, RETRYABLE,
                lambda reason, content: plan.drop("definition", domain, concept, None, reason, content))
            if sections:
                plan.definitions[concept] = sections[0]
            for index in range(1, s.problems_per_concept + 1):
                messages = self.problem_messages(domain, concept, index)
                pair = self._ask(
                    plan, answers,
                    lambda attempt: self.request("problem", domain, concept, index, attempt, messages, s.temperature),
                    lambda answer: parse_problem(answer, concept), RETRYABLE,
                    lambda reason, content: plan.drop("problem", domain, concept, index, reason, content))
                if not pair:
                    continue
                check_messages = self.prompts.messages("check", domain, concept=concept, problem=pair[0],
                                                       solution=pair[1])
                checked = self._ask(
                    plan, answers,
                    lambda attempt: self.request("check", domain, concept, index, attempt, check_messages,
                                                 s.check_temperature),
                    lambda answer: verdict(answer, coding=domain.coding, solution=pair[1]), RETRYABLE_CHECK,
                    lambda reason, content: plan.drop("check", domain, concept, index, reason, content))
                if checked:
                    plan.pairs[concept].append((index, pair[0], checked[0]))
        return plan

    def heldout(self) -> list[str]:
        """The held-out concepts: per domain, `heldout_fraction` of its concepts (at least two stay for training);
        if that holds none out anywhere, one concept of the first domain with three or more."""
        fraction, chosen = self.settings.heldout_fraction, []
        for domain in self.concepts:
            count = min(int(fraction * len(domain.concepts) + 1e-9), max(len(domain.concepts) - 2, 0))
            rng = random.Random(derived_seed(self.settings.seed, "heldout", domain.name))
            chosen += rng.sample(list(domain.concepts), count)
        if fraction > 0 and not chosen:
            for domain in self.concepts:
                if len(domain.concepts) >= 3:
                    rng = random.Random(derived_seed(self.settings.seed, "heldout", domain.name))
                    chosen.append(rng.choice(domain.concepts))
                    break
        return chosen
