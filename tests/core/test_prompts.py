"""A1111 prompt semantics: emphasis, prompt editing, extra-network tags and 75-token chunks."""

from __future__ import annotations

import pytest

from sdconcepts.prompts.chunks import EmbeddingEntry, EmbeddingFix, build_chunks, build_embedding_index, count_tokens
from sdconcepts.prompts.editing import get_prompt_schedule, get_prompt_schedules, text_at_step
from sdconcepts.prompts.emphasis import parse_prompt_attention
from sdconcepts.prompts.network_tags import (
    ExtraNetworkTag,
    HypernetworkTag,
    hypernetwork_tags,
    parse_extra_network_tags,
    parse_hypernetwork_tags,
)

# --- emphasis -------------------------------------------------------------------------------------------------------

ATTENTION_CASES = [
    # A1111's docstring examples, float bits included.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("", [("", 1.0)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[a", [("a", 1 / 1.1)]),
    ("(a: 1.3 ) b", [("a", 1.3), (" b", 1.0)]),
    ("(a:-0.5)", [("a", -0.5)]),
    # Closers with nothing open, and ':w)' with no '(' open, are literal text.
    ("a ) b ] c", [("a ) b ] c", 1.0)]),
    ("a :1.5) b", [("a :1.5) b", 1.0)]),
    ("[a:1.5)", [("a:1.5)", 1 / 1.1)]),
    # Unclosed brackets close at the end, round ones before square ones (the float result shows the order).
    ("[(a", [("a", 1.0 * 1.1 * (1 / 1.1))]),
    # Escapes; a lone backslash escapes nothing and vanishes.
    ("a\\\\b", [("a\\b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(\\(a)", [("(a", 1.1)]),
    # BREAK: upper-case, whole word, surrounding whitespace eaten.
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a BREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    # Inside brackets the -1 is multiplied too, so it no longer reads as BREAK downstream.
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES)
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


def test_unreadable_emphasis_weight_raises() -> None:
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# --- prompt editing and alternation -----------------------------------------------------------------------------------

FANTASY = (
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
    "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
)
ALTERNATING = [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]

SCHEDULE_CASES = [
    # A1111's docstring examples (10 steps).
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, ALTERNATING),
    ("[fe|]male", 10, [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", 10, [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    # A1111's header comment, at 100 steps.
    (
        FANTASY,
        100,
        [
            (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (75, "fantasy landscape with a lake and an oak in background masterful"),
            (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
    # Numbers: fractions truncate (0.29 * 100 is 28.999...), steps cap at the total, exponents and signs are numbers.
    ("[a:b:0.29]", 100, [(28, "a"), (100, "b")]),
    ("a [b:2.0]", 10, [(10, "a ")]),
    ("a [b:1e1]", 10, [(10, "a ")]),
    ("a [b:+3]", 10, [(3, "a "), (10, "a b")]),
    ("park [night::-1]", 10, [(10, "park ")]),
    ("[a: 3 ]", 10, [(3, ""), (10, "a")]),
    # Nesting: alternation inside an edit, edits and emphasis inside alternation and emphasis.
    ("[a:[b|c]:2]", 4, [(1, "a"), (2, "a"), (3, "b"), (4, "c")]),
    ("[cat|dog] [b:c:3]", 4, [(1, "cat b"), (2, "dog b"), (3, "cat b"), (4, "dog c")]),
    ("x [y:(z:1.2):0.5]", 10, [(5, "x y"), (10, "x (z:1.2)")]),
    ("(a:[b|c]:1.5)", 3, [(1, "(a:b:1.5)"), (2, "(a:c:1.5)"), (3, "(a:b:1.5)")]),
    ("[(a:1.5)|[b]]", 2, [(1, "(a:1.5)"), (2, "[b]")]),
    # A '|' outside an alternation or a dangling backslash fails the parse: the whole prompt is used literally.
    # (A1111's docstring still expects [(5, "a  c"), (10, "a {b|d{ c")] here; its real parser gives this.)
    ("a [{b|d{:.5] c", 10, [(10, "a [{b|d{:.5] c")]),
    ("a | b", 10, [(10, "a | b")]),
    ("a [b:3] |", 10, [(10, "a [b:3] |")]),
    ("a [b|c", 10, [(10, "a [b|c")]),
    ("tail [b:3]\\", 10, [(10, "tail [b:3]\\")]),
    ("a\\\nb [c:2]", 10, [(10, "a\\\nb [c:2]")]),
    # Escaped brackets are text.
    ("a \\[b:3\\]", 10, [(10, "a \\[b:3\\]")]),
]


@pytest.mark.parametrize(("prompt", "steps", "expected"), SCHEDULE_CASES)
def test_get_prompt_schedule(prompt: str, steps: int, expected: list[tuple[int, str]]) -> None:
    assert get_prompt_schedule(prompt, steps) == expected


@pytest.mark.parametrize(
    ("prompt", "kwargs", "expected"),
    [
        # A1111's hires-pass doctests: integers offset by the base steps, fractions by 1.0.
        ("a [b:.5] c", {"hires_steps": 10}, [(10, "a b c")]),
        ("a [b:1.5] c", {"hires_steps": 10}, [(5, "a  c"), (10, "a b c")]),
        # Legacy scheduling reads any value below 1 as a fraction, the rest as steps.
        ("a [b:2.0]", {"use_old_scheduling": True}, [(2, "a "), (10, "a b")]),
    ],
)
def test_schedule_options(prompt: str, kwargs: dict[str, object], expected: list[tuple[int, str]]) -> None:
    assert get_prompt_schedule(prompt, 10, **kwargs) == expected  # type: ignore[arg-type]


def test_get_prompt_schedules_keeps_order_and_duplicates() -> None:
    assert get_prompt_schedules(["a [b:3]", "x", "a [b:3]"], 10) == [
        [(3, "a "), (10, "a b")],
        [(10, "x")],
        [(3, "a "), (10, "a b")],
    ]


@pytest.mark.parametrize(
    ("prompt", "steps", "expected_by_step"),
    [
        # A1111 compares its 0-based step counter with 1-based end steps: 'a ' holds for steps 0-3, not 0-2.
        ("a [b:3]", 10, ["a "] * 4 + ["a b"] * 6),
        # So alternation starts with the first option twice.
        ("[x|y]", 5, ["x", "x", "y", "x", "y"]),
    ],
)
def test_text_at_step(prompt: str, steps: int, expected_by_step: list[str]) -> None:
    schedule = get_prompt_schedule(prompt, steps)
    assert [text_at_step(schedule, step) for step in range(steps)] == expected_by_step


def test_text_at_step_past_the_end_falls_back_to_the_first_entry() -> None:
    assert text_at_step([(3, "first"), (10, "last")], 11) == "first"


# --- extra-network tags ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        (
            "a <hypernet:foo:0.5> b <lora:bar> c",
            "a  b  c",
            [ExtraNetworkTag("hypernet", ("foo", "0.5")), ExtraNetworkTag("lora", ("bar",))],
        ),
        ("<hypernet:a:b:c>x", "x", [ExtraNetworkTag("hypernet", ("a", "b", "c"))]),
        ("<hypernet:a>b>", "b>", [ExtraNetworkTag("hypernet", ("a",))]),
        ("<hypernet::0.5>", "", [ExtraNetworkTag("hypernet", ("", "0.5"))]),
        # Not tags: a space in the kind, no argument, no closing '>'.
        ("<hyper net:x> <hypernet:> <hypernet:x", "<hyper net:x> <hypernet:> <hypernet:x", []),
        # Tags are removed before scheduling, so they are never scheduled.
        (
            "[<hypernet:a:1>:<hypernet:b:1>:10]",
            "[::10]",
            [ExtraNetworkTag("hypernet", ("a", "1")), ExtraNetworkTag("hypernet", ("b", "1"))],
        ),
    ],
)
def test_parse_extra_network_tags(prompt: str, text: str, tags: list[ExtraNetworkTag]) -> None:
    assert parse_extra_network_tags(prompt) == (text, tags)


@pytest.mark.parametrize(
    ("prompt", "default", "expected"),
    [
        ("<hypernet:foo:0.5>", 1.0, [HypernetworkTag("foo", 0.5)]),
        ("<hypernet:foo>", 1.0, [HypernetworkTag("foo", 1.0)]),
        ("<hypernet:foo>", 0.7, [HypernetworkTag("foo", 0.7)]),
        ("<hypernet:foo:-1>", 1.0, [HypernetworkTag("foo", -1.0)]),
        ("<hypernet:foo:2:extra>", 1.0, [HypernetworkTag("foo", 2.0)]),
        ("<lora:x:1> <hypernet:b:0.2> <hypernet:a>", 1.0, [HypernetworkTag("b", 0.2), HypernetworkTag("a", 1.0)]),
    ],
)
def test_hypernetwork_tags(prompt: str, default: float, expected: list[HypernetworkTag]) -> None:
    _, tags = parse_extra_network_tags(prompt)
    assert hypernetwork_tags(tags, default_strength=default) == expected
    assert parse_hypernetwork_tags(prompt, default_strength=default)[1] == expected


def test_hypernetwork_tag_with_unreadable_strength_raises() -> None:
    with pytest.raises(ValueError, match="strong"):
        hypernetwork_tags([ExtraNetworkTag("hypernet", ("foo", "strong"))])


# --- chunks ---------------------------------------------------------------------------------------------------------

BOS, EOS, COMMA = 49406, 49407, 267
WORD_IDS = {",": COMMA, "cat": 10, "big": 11, "emb": 12, "long": 13, "BREAK": 14, "(cat)": 15}


def fake_tokenize(texts: list[str]) -> list[list[int]]:
    """One id per word (``wN`` is 1000 + N), a comma is its own word."""
    return [
        [WORD_IDS[w] if w in WORD_IDS else 1000 + int(w[1:]) for w in text.replace(",", " , ").split()]
        for text in texts
    ]


def words(start: int, count: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + count))


def ids(start: int, count: int) -> list[int]:
    return list(range(1000 + start, 1000 + start + count))


def chunk_body(chunk_tokens: tuple[int, ...]) -> list[int]:
    """A chunk's content without BOS, trailing padding and EOS."""
    body = list(chunk_tokens[1:-1])
    while body and body[-1] == EOS:
        body.pop()
    return body


def chunks_of(text: str, **kwargs: object) -> tuple[list[list[int]], int]:
    chunks, count = build_chunks(text, fake_tokenize, bos=BOS, eos=EOS, comma=COMMA, **kwargs)  # type: ignore[arg-type]
    for chunk in chunks:
        assert len(chunk.tokens) == len(chunk.multipliers) == 77
        assert (chunk.tokens[0], chunk.tokens[-1]) == (BOS, EOS)
    return [chunk_body(chunk.tokens) for chunk in chunks], count


CHUNK_CASES = [
    ("empty prompt: one chunk", "", {}, [[]], 0),
    ("short", "cat big", {}, [[10, 11]], 2),
    ("over 75 tokens", words(0, 80), {}, [ids(0, 75), ids(75, 5)], 80),
    ("exactly 75 tokens", words(0, 75), {}, [ids(0, 75)], 75),
    ("BREAK closes a chunk", "w1 w2 BREAK w3", {}, [ids(1, 2), ids(3, 1)], 76),
    ("BREAK alone", "BREAK", {}, [[]], 75),
    ("BREAK inside brackets is text", "(w1 BREAK w2)", {}, [[1001, 14, 1002]], 3),
    (
        "backtrack: comma 5 back moves the tail",
        f"{words(0, 70)}, {words(70, 10)}",
        {},
        [[*ids(0, 70), COMMA], ids(70, 10)],
        85,
    ),
    (
        "backtrack: comma exactly 20 back",
        f"{words(0, 55)}, {words(55, 30)}",
        {},
        [[*ids(0, 55), COMMA], ids(55, 30)],
        105,
    ),
    (
        "no backtrack: comma 21 back",
        f"{words(0, 54)}, {words(54, 30)}",
        {},
        [[*ids(0, 54), COMMA, *ids(54, 20)], ids(74, 10)],
        85,
    ),
    (
        "no backtrack when disabled",
        f"{words(0, 70)}, {words(70, 10)}",
        {"comma_backtrack": 0},
        [[*ids(0, 70), COMMA, *ids(70, 4)], ids(74, 6)],
        81,
    ),
    (
        "no backtrack when the comma itself overflows",
        f"{words(0, 75)}, {words(75, 3)}",
        {},
        [ids(0, 75), [COMMA, *ids(75, 3)]],
        79,
    ),
    ("emphasis off: brackets are text", "(cat) BREAK", {"emphasis": False}, [[15, 14]], 2),
]


@pytest.mark.parametrize(
    ("text", "kwargs", "expected", "count"), [case[1:] for case in CHUNK_CASES], ids=[case[0] for case in CHUNK_CASES]
)
def test_chunk_tokens(text: str, kwargs: dict[str, object], expected: list[list[int]], count: int) -> None:
    assert chunks_of(text, **kwargs) == (expected, count)


def test_empty_chunk_is_bos_then_eos() -> None:
    chunks, _ = build_chunks("", fake_tokenize, bos=BOS, eos=EOS, comma=COMMA)
    assert chunks[0].tokens == (BOS,) + (EOS,) * 76
    assert chunks[0].multipliers == (1.0,) * 77
    assert chunks[0].fixes == ()


def test_multipliers_follow_emphasis_and_padding_is_one() -> None:
    (chunk,), _ = build_chunks("cat (big:1.5) [emb]", fake_tokenize, bos=BOS, eos=EOS, comma=COMMA)
    assert chunk.tokens[:4] == (BOS, 10, 11, 12)
    assert chunk.multipliers[:4] == (1.0, 1.0, 1.5, 1 / 1.1)
    assert set(chunk.multipliers[4:]) == {1.0}


EMB = EmbeddingEntry(ids=(12,), name="emb", vectors=3)
BIG = EmbeddingEntry(ids=(11,), name="big", vectors=2)
BIG_EMB = EmbeddingEntry(ids=(11, 12), name="big emb", vectors=4)
# Deliberately shortest first: the chunker must try the longest match itself.
EMBEDDINGS = {11: [BIG, BIG_EMB], 12: [EMB]}


def embedded(text: str, **kwargs: object) -> tuple[list[tuple[list[int], list[float], list[EmbeddingFix]]], int]:
    chunks, count = build_chunks(
        text,
        fake_tokenize,
        bos=BOS,
        eos=EOS,
        comma=COMMA,
        embeddings=EMBEDDINGS,
        **kwargs,  # type: ignore[arg-type]
    )
    return [
        (chunk_body(c.tokens), list(c.multipliers[1 : 1 + len(chunk_body(c.tokens))]), list(c.fixes)) for c in chunks
    ], count


EMBEDDING_CASES = [
    ("multi-vector", "cat emb cat", [([10, 0, 0, 0, 10], [1.0] * 5, [EmbeddingFix(1, "emb", 3)])], 5),
    ("longest match wins", "big emb cat", [([0, 0, 0, 0, 10], [1.0] * 5, [EmbeddingFix(0, "big emb", 4)])], 5),
    ("shorter match when the longer fails", "big cat", [([0, 0, 10], [1.0] * 3, [EmbeddingFix(0, "big", 2)])], 3),
    (
        "matching stays inside one emphasis segment",
        "big (emb)",
        [([0, 0, 0, 0, 0], [1.0, 1.0, 1.1, 1.1, 1.1], [EmbeddingFix(0, "big", 2), EmbeddingFix(2, "emb", 3)])],
        5,
    ),
    ("weight copied to placeholders", "(emb:1.5)", [([0, 0, 0], [1.5] * 3, [EmbeddingFix(0, "emb", 3)])], 3),
    (
        "an embedding that would straddle moves wholly to the next chunk",
        f"{words(0, 73)} emb w73",
        [(ids(0, 73), [1.0] * 73, []), ([0, 0, 0, 1073], [1.0] * 4, [EmbeddingFix(0, "emb", 3)])],
        79,
    ),
    (
        "an embedding that fits exactly stays",
        f"{words(0, 72)} emb w72",
        [([*ids(0, 72), 0, 0, 0], [1.0] * 75, [EmbeddingFix(72, "emb", 3)]), ([1072], [1.0], [])],
        76,
    ),
    (
        # A1111 quirk: a backtrack moves placeholders but leaves their fix in the closed chunk.
        "backtrack moves placeholders but not their fix",
        f"{words(0, 70)}, emb w70 w71",
        [([*ids(0, 70), COMMA], [1.0] * 71, [EmbeddingFix(71, "emb", 3)]), ([0, 0, 0, 1070, 1071], [1.0] * 5, [])],
        80,
    ),
]


@pytest.mark.parametrize(
    ("text", "expected", "count"), [case[1:] for case in EMBEDDING_CASES], ids=[case[0] for case in EMBEDDING_CASES]
)
def test_embedding_placement(
    text: str, expected: list[tuple[list[int], list[float], list[EmbeddingFix]]], count: int
) -> None:
    assert embedded(text) == (expected, count)


def test_embedding_wider_than_a_chunk_raises() -> None:
    wide = {13: [EmbeddingEntry(ids=(13,), name="long", vectors=76)]}
    with pytest.raises(ValueError, match="'long' has 76 vectors"):
        build_chunks("long", fake_tokenize, bos=BOS, eos=EOS, comma=COMMA, embeddings=wide)


def test_build_embedding_index_sorts_longest_first_and_keeps_ties_in_order() -> None:
    twin = EmbeddingEntry(ids=(11,), name="Big", vectors=1)
    assert build_embedding_index([BIG, EMB, BIG_EMB, twin]) == {11: [BIG_EMB, BIG, twin], 12: [EMB]}
    with pytest.raises(ValueError, match="tokenises to nothing"):
        build_embedding_index([EmbeddingEntry(ids=(), name=" ", vectors=1)])


def test_count_tokens_rounds_the_limit_to_chunks() -> None:
    assert count_tokens(words(0, 80), fake_tokenize, bos=BOS, eos=EOS, comma=COMMA) == (80, 150)
    assert count_tokens("", fake_tokenize, bos=BOS, eos=EOS, comma=COMMA) == (0, 75)


def test_real_clip_tokenizer_gives_two_chunks_of_77() -> None:
    from sdconcepts.backends.tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer("sd1")

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [list(row) for row in tok(texts, truncation=False, add_special_tokens=False)["input_ids"]]

    comma = tok.convert_tokens_to_ids(",</w>")
    prompt = "a photo of a cat, " * 20  # 6 tokens per phrase, 120 in all
    every_id = tokenize([prompt])[0]
    assert len(every_id) == 120

    chunks, count = build_chunks(prompt, tokenize, bos=49406, eos=49407, comma=comma)

    assert [len(chunk.tokens) for chunk in chunks] == [77, 77]
    # The chunk fills at 75 with the last comma 4 back, so the 3 tokens after it move on.
    assert chunks[0].tokens == (49406, *every_id[:72], 49407, 49407, 49407, 49407)
    assert chunks[1].tokens == (49406, *every_id[72:], *[49407] * 28)
    assert count == 75 + 48
