"""The built-in reasoning task that ships with the package: held out as it promises (no training row mentions a
held-out concept), whole (every judged document is in the corpus), read the same way by `diffembed train` and by
the held-out evaluation."""


from diffembed_hf import reasoning_task
from diffembed_hf.training_data import load_training_data
from diffembed_hf.sentence_transformer import instruction_prompt


def _concept(definition: str) -> str | None:
    """The concept a definition names: the line after its "**Concept**" header (some have only a definition)."""
    lines = [line.strip() for line in definition.splitlines() if line.strip()]
    header = next((i for i, line in enumerate(lines) if line.startswith("**Concept**")), None)
    return None if header is None or header + 1 >= len(lines) else lines[header + 1].lower()


def test_the_held_out_concepts_are_never_trained_on():
    task = reasoning_task.held_out_task()
    assert (len(task.queries), len(task.corpus)) == (96, 209)
    judged = {doc for docs in task.relevant.values() for doc in docs}
    assert set(task.relevant) == set(task.queries) and judged <= set(task.corpus)
    rows = reasoning_task.training_rows()
    assert len(rows) == 835
    trained_texts = {r["positive_document"].strip() for r in rows} | {r["hard_negative_document"].strip() for r in rows}
    assert not {task.corpus[doc].strip() for doc in judged} & trained_texts
    held_out = {_concept(task.corpus[doc]) for doc in judged} - {None}
    trained = {_concept(text) for text in trained_texts} - {None}
    assert len(held_out) > 20 and len(trained) > 100 and not held_out & trained
    # the control: the same comparison does find what training positives and negatives share
    positives = {_concept(r["positive_document"]) for r in rows} - {None}
    assert positives & {_concept(r["hard_negative_document"]) for r in rows}
    assert not set(task.queries.values()) & {r["user_query"] for r in rows}


def test_training_reads_the_rows_with_the_task_instruction():
    split = load_training_data(str(reasoning_task.TRAIN_FILE), eval_fraction=0.0)
    assert split.instructions == [reasoning_task.instruction()] and split.negatives_per_row == 1
    prompt = instruction_prompt(reasoning_task.instruction())
    assert reasoning_task.held_out_task().query_prompt == prompt
    assert all(anchor.startswith(prompt) for anchor in split.train["anchor"])
    assert len(split.train) == 835
