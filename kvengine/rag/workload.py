"""A RAG workload with checkable answers: documents of real prose with a planted fact each, and questions.

Each document is a stretch of the King James Bible (the prose haystack of
kvengine/eval/tasks/haystack.py, which holds no digits) with one planted
sentence, "The access code of the <name> room is <code>.", where the name is a
made-up word and the code four digits, both unique to the document. A question
retrieves 4-6 documents in random order, one of them holding the answer, and
asks for that room's code; an answer is right when the code appears in the
output. Everything is drawn from a seed; nothing is downloaded.

This module only builds text; running it is kvengine/bench/rag.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvengine.errors import InvalidRequestError
from kvengine.eval.tasks.example import Tokenizer
from kvengine.eval.tasks.haystack import fit, made_up_words, prose, prose_offset, with_inserts

SYSTEM = "Answer the question from the documents. Answer with the code only."


@dataclass(frozen=True)
class RagDocument:
    name: str  # the made-up room name planted in it
    code: str  # its four-digit access code
    text: str
    num_tokens: int


@dataclass(frozen=True)
class RagQuestion:
    documents: tuple[int, ...]  # indices into the document pool, in prompt order
    target: int  # the document that holds the answer
    question: str
    answer: str

    def is_correct(self, output: str) -> bool:
        return self.answer in output


def build_documents(
    tokenizer: Tokenizer, num_documents: int = 50, min_tokens: int = 300, max_tokens: int = 800, seed: int = 0
) -> list[RagDocument]:
    """`num_documents` documents of `min_tokens`..`max_tokens` tokens (drawn uniformly), each with its fact."""
    if not 0 < min_tokens <= max_tokens:
        raise InvalidRequestError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    names = made_up_words(rng, num_documents)
    codes = rng.sample(range(1000, 10000), num_documents)
    docs = []
    for name, code in zip(names, codes, strict=True):
        offset, depth = prose_offset(rng), rng.uniform(0.1, 0.9)
        fact = f"The access code of the {name.capitalize()} room is {code}."
        target = rng.randint(min_tokens, max_tokens)

        def build(num_words: int, offset: int = offset, fact: str = fact, depth: float = depth) -> str:
            return with_inserts(prose(num_words, offset), [(depth, fact)], by_words=True)

        text, num_tokens = fit(tokenizer, target, build, unit_tokens=1)
        docs.append(RagDocument(name.capitalize(), str(code), text, num_tokens))
    return docs


def build_questions(
    documents: list[RagDocument], num_questions: int, min_docs: int = 4, max_docs: int = 6, seed: int = 0
) -> list[RagQuestion]:
    """Questions over `min_docs`..`max_docs` retrieved documents each, in random order, one holding the answer."""
    if not 0 < min_docs <= max_docs <= len(documents):
        raise InvalidRequestError(f"need 0 < min_docs <= max_docs <= {len(documents)} documents")
    rng = random.Random(seed + 1)
    questions = []
    for _ in range(num_questions):
        chosen = rng.sample(range(len(documents)), rng.randint(min_docs, max_docs))
        target = rng.choice(chosen)
        doc = documents[target]
        question = f"What is the access code of the {doc.name} room?"
        questions.append(RagQuestion(tuple(chosen), target, question, doc.code))
    return questions
