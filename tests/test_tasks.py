"""Task generators: answers planted once at the asked depth, lengths on budget, determinism, bad input."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from kvengine.errors import InvalidRequestError
from kvengine.eval.tasks import (
    RULER_TASKS,
    expand_task_names,
    haystack,
    load_jsonl_tasks,
    make_example,
    score,
)

NEEDLE_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"]


class ByteTokenizer:
    """One token per UTF-8 byte (ids < 256: fits the tiny test models' vocabulary)."""

    eos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class WordTokenizer:
    """One token per word or punctuation mark, a BPE-like granularity."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


TOKENIZERS: dict[str, ByteTokenizer | WordTokenizer] = {"bytes": ByteTokenizer(), "words": WordTokenizer()}


@pytest.mark.parametrize("tok", list(TOKENIZERS))
@pytest.mark.parametrize("task", list(RULER_TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_length_within_two_percent(task: str, tok: str, length: int) -> None:
    tokenizer = TOKENIZERS[tok]
    ex = make_example(task, tokenizer, length, seed=1, depth=0.4)
    measured = len(tokenizer.encode(ex.context))
    assert measured == ex.num_tokens
    assert 0.98 * length <= measured <= length
    assert ex.length == length and ex.task == task and ex.questions


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_answer_once_at_depth(task: str, depth: float) -> None:
    tokenizer = WordTokenizer()
    ex = make_example(task, tokenizer, 2048, seed=3, depth=depth)
    assert ex.depth == depth
    # The first question's first answer is the planted needle value (vt: the chain's start value).
    target = ex.questions[0].answers[0]
    if task == "vt":
        target = re.search(r"assigned the value (\d+)", ex.questions[0].text).group(1)  # type: ignore[union-attr]
    assert ex.context.count(target) == 1
    where = len(tokenizer.encode(ex.context[: ex.context.index(target)])) / ex.num_tokens
    # Distractor needles (at most 9 sentences) may sit before the target: a few percent of 2,048 tokens.
    assert abs(where - depth) < 0.05
    for q in ex.questions:
        for answer in q.answers:
            assert answer in ex.context


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_same_seed_same_example(task: str) -> None:
    tok = WordTokenizer()
    a, b = (make_example(task, tok, 1500, seed=7, index=2, depth=0.3) for _ in range(2))
    assert a == b
    c = make_example(task, tok, 1500, seed=8, index=2, depth=0.3)
    assert c.context != a.context


def _word_counts(context: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for w in re.findall(r"[a-z]+", context):
        counts[w] = counts.get(w, 0) + 1
    return counts


@pytest.mark.parametrize(("task", "num"), [("cwe", 10), ("fwe", 3)])
def test_word_tasks_answers_are_the_most_frequent(task: str, num: int) -> None:
    ex = make_example(task, WordTokenizer(), 2048, seed=0)
    counts = _word_counts(ex.context)
    ranked = sorted(counts, key=counts.__getitem__, reverse=True)
    assert set(ranked[:num]) == set(ex.questions[0].answers)
    assert counts[ranked[num - 1]] > counts[ranked[num]]  # no tie with the first non-answer


def test_vt_chain_resolves_to_the_answers() -> None:
    ex = make_example("vt", WordTokenizer(), 1024, seed=5, depth=0.2)
    value = re.search(r"value (\d+)", ex.questions[0].text).group(1)  # type: ignore[union-attr]
    assigned = dict(re.findall(r"VAR ([A-Z]+) = (\w+)\.", ex.context))
    reaches = {name for name in assigned if _resolve(assigned, name) == value}
    assert reaches == set(ex.questions[0].answers)


def _resolve(assigned: dict[str, str], name: str) -> str:
    while name in assigned:
        name = assigned[name]
    return name


def test_score_is_fraction_of_answers_found() -> None:
    assert score(("123", "abc"), "It is ABC and 123.") == 1.0
    assert score(("123", "abc"), "only 123") == 0.5
    assert score(("123",), "nothing") == 0.0


def test_expand_ruler() -> None:
    assert expand_task_names(["ruler"]) == list(RULER_TASKS)
    assert expand_task_names(["vt", "ruler"])[0] == "vt"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(task="haystack"), "unknown task 'haystack'; known tasks"),
        (dict(length=9000, max_len=8192), "beyond the model's context of 8192"),
        (dict(depth=1.5), "depth must be in"),
        (dict(length=10), "at least"),
    ],
)
def test_bad_requests(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = dict(task="niah_single", tokenizer=WordTokenizer(), length=1024, seed=0)
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        make_example(**{**args, **kwargs})


def _write(path: Path, records: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_groups_questions_of_one_context(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.jsonl",
        [
            {"context": "Ann is 31. Bob is 40.", "question": "Ann's age?", "answers": "31"},
            {"context": "Ann is 31. Bob is 40.", "question": "Bob's age?", "answers": ["40"]},
            "",
            {"context": "Sky.", "question": "Color?", "answers": ["blue", "grey"], "task": "sky"},
        ],
    )
    examples = load_jsonl_tasks(path, WordTokenizer())
    assert [e.task for e in examples] == ["mine", "sky"]
    assert [q.answers for q in examples[0].questions] == [("31",), ("40",)]
    assert examples[0].num_tokens == len(WordTokenizer().encode("Ann is 31. Bob is 40."))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"context": "c", "question": "q"}, "mine.jsonl:2: missing field 'answers'"),
        ({"question": "q", "answers": "a"}, "mine.jsonl:2: missing field 'context'"),
        ("{not json", "mine.jsonl:2: not valid JSON"),
        ({"context": "c", "question": "q", "answers": []}, "mine.jsonl:2: 'answers' must be"),
        ({"context": " ", "question": "q", "answers": "a"}, "mine.jsonl:2: 'context' must be"),
        ([1, 2], "mine.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_bad_lines_name_line_and_field(tmp_path: Path, line: Any, message: str) -> None:
    good = {"context": "c", "question": "q", "answers": "a"}
    path = _write(tmp_path / "mine.jsonl", [good, line])
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        load_jsonl_tasks(path)


def test_jsonl_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="cannot read task file"):
        load_jsonl_tasks(tmp_path / "absent.jsonl")
    with pytest.raises(InvalidRequestError, match="has no examples"):
        load_jsonl_tasks(_write(tmp_path / "empty.jsonl", [""]))


@pytest.mark.model
@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_bundled_tokenizer_lengths_and_depth(bundled: Any, task: str) -> None:
    """With SmolLM2's BPE tokenizer: within 2% of 1,024 and 4,096 tokens, needles once near their depth."""
    tok = bundled.tokenizer
    for length in (1024, 4096):
        ex = make_example(task, tok, length, seed=0, depth=0.3, max_len=bundled.max_context_len)
        measured = len(tok.encode(ex.context, add_special_tokens=False))
        assert 0.98 * length <= measured <= length
        if task in NEEDLE_TASKS and task != "vt":
            target = ex.questions[0].answers[0]
            assert ex.context.count(target) == 1
            where = (
                len(tok.encode(ex.context[: ex.context.index(target)], add_special_tokens=False)) / measured
            )
            assert abs(where - 0.3) < 0.05


def _prose_missing() -> str | None:
    try:
        haystack.prose_path()
    except InvalidRequestError as exc:
        return str(exc)
    return None


needs_prose = pytest.mark.skipif(
    _prose_missing() is not None, reason=f"prose haystack package not installed: {_prose_missing()}"
)


def _prose_context(tokenizer: Any, length: int, depth: float, seed: int) -> tuple[str, int, str]:
    """A needle in a prose haystack fitted to `length` tokens, as the needle tasks build one."""
    rng = random.Random(seed)
    needle = f"The secret code for {haystack.made_up_words(rng, 1)[0]} is {rng.randrange(10**6, 10**7)}."
    build = haystack.haystack_builder("prose", rng)
    context, num_tokens = haystack.fit(tokenizer, length, lambda n: build(n, [(depth, needle)]), 2)
    return context, num_tokens, needle


@needs_prose
def test_prose_holds_no_digits_and_no_capital_words() -> None:
    sentences = haystack.prose_sentences()
    assert len(sentences) > 10_000
    text = " ".join(" ".join(s) for s in sentences)
    assert not re.search(r"\d", text)
    assert not re.search(r"\b[A-Z]{2,}\b", text)
    assert "In the beginning God created" in text


@needs_prose
@pytest.mark.parametrize("tok", list(TOKENIZERS))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.9, 1.0])
def test_prose_needle_once_at_depth_and_length_on_budget(tok: str, depth: float) -> None:
    tokenizer = TOKENIZERS[tok]
    context, num_tokens, needle = _prose_context(tokenizer, 2048, depth, seed=4)
    assert len(tokenizer.encode(context)) == num_tokens and 0.98 * 2048 <= num_tokens <= 2048
    value = needle.split()[-1].rstrip(".")
    assert context.count(value) == 1 and context.count(needle) == 1
    where = len(tokenizer.encode(context[: context.index(needle)])) / num_tokens
    assert abs(where - depth) < 0.05


@needs_prose
def test_prose_same_seed_same_text_other_seed_elsewhere() -> None:
    a, b = (haystack.haystack_builder("prose", random.Random("s1"))(300, []) for _ in range(2))
    assert a == b and len(a.split()) == 300
    assert haystack.haystack_builder("prose", random.Random("s2"))(300, []) != a


def test_noise_builder_is_the_noise_haystack() -> None:
    inserts = [(0.5, "The secret code for bako is 1234567.")]
    built = haystack.haystack_builder("noise", random.Random(0))(400, inserts)
    assert built == haystack.with_inserts(haystack.noise(400), inserts)


def test_inserts_by_words_land_at_the_nearest_boundary() -> None:
    filler = ["a b c d e f g h", "i", "j", "k l"]  # 12 words; boundaries after 0, 8, 9, 10, 12
    assert haystack.with_inserts(filler, [(0.7, "X")], by_words=True).split().index("X") == 8
    assert haystack.with_inserts(filler, [(0.7, "X")]).split().index("X") == 10  # by sentences: after 3


def test_unknown_haystack_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError, match="unknown haystack 'poetry'; known haystacks: noise, prose"):
        haystack.haystack_builder("poetry", random.Random(0))


def test_missing_prose_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(haystack, "PROSE_PACKAGE", "kvengine-no-such-package")
    with pytest.raises(InvalidRequestError, match=re.escape(haystack.PROSE_INSTALL)):
        haystack.haystack_builder("prose", random.Random(0))


@needs_prose
@pytest.mark.model
def test_bundled_tokenizer_prose_length_and_depth(bundled: Any) -> None:
    for length in (1024, 4096):
        context, num_tokens, needle = _prose_context(bundled.tokenizer, length, 0.3, seed=0)
        measured = len(bundled.tokenizer.encode(context, add_special_tokens=False))
        assert measured == num_tokens and 0.98 * length <= measured <= length
        prefix = bundled.tokenizer.encode(context[: context.index(needle)], add_special_tokens=False)
        assert abs(len(prefix) / measured - 0.3) < 0.05


@needs_prose
@pytest.mark.parametrize("tok", list(TOKENIZERS))
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_prose_examples_on_budget_answer_once_at_depth_deterministic(task: str, tok: str) -> None:
    tokenizer = TOKENIZERS[tok]
    ex = make_example(task, tokenizer, 2048, seed=3, depth=0.4, haystack="prose")
    assert len(tokenizer.encode(ex.context)) == ex.num_tokens and 0.98 * 2048 <= ex.num_tokens <= 2048
    target = ex.questions[0].answers[0]
    if task == "vt":
        target = re.search(r"assigned the value (\d+)", ex.questions[0].text).group(1)  # type: ignore[union-attr]
    assert ex.context.count(target) == 1
    where = len(tokenizer.encode(ex.context[: ex.context.index(target)])) / ex.num_tokens
    assert abs(where - 0.4) < 0.05
    assert ex == make_example(task, tokenizer, 2048, seed=3, depth=0.4, haystack="prose")
    assert ex.context != make_example(task, tokenizer, 2048, seed=3, depth=0.4).context  # not the noise one


def test_make_example_unknown_haystack() -> None:
    with pytest.raises(InvalidRequestError, match="unknown haystack 'poetry'; known haystacks: noise, prose"):
        make_example("niah_single", WordTokenizer(), 1024, seed=0, haystack="poetry")
