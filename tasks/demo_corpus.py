"""The small world the built-in demo model is trained and evaluated on.

Pre-training teaches a skill (two-digit addition written as equations, plus a few other numeric
question types and simple sentences); post-training (LoRA) teaches the instruction format in which
the skill is asked for: ``"Q: what is 12 plus 7?\\nA:"`` → ``"19"``. Answers are exact, so the
evaluation is exact match, and a compressed model can measurably lose accuracy.

Everything is a pure function of its arguments (``random.Random`` seeded with a string, which Python
hashes with SHA-512, so draws are the same on every run and machine).

Operand pairs are partitioned once into disjoint pools (train / eval / calibration / reference) on
the *unordered* pair, so ``7 + 12`` never leaks the eval question ``12 + 7`` into training: eval
accuracy measures generalised addition, not memorised facts.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Literal

import pandas as pd

Split = Literal["train", "eval", "calibration", "reference"]
Role = Literal["eval", "calibration", "reference"]

#: Operands are 0..99: one- and two-digit addition, sums up to 198 (three-digit answers need a carry
#: into the hundreds, which is where small models make most of their mistakes).
MAX_OPERAND = 99
#: Shares of the 5,050 unordered pairs: eval and reference are never trained on.
_POOL_SHARES: dict[Split, float] = {"train": 0.75, "eval": 0.10, "calibration": 0.05, "reference": 0.10}
_PARTITION_SEED = "lockgate-demo-partition-v1"

#: Phrasings of the addition question. Every split uses all of them, so the reference traffic has
#: the same mix as the eval set.
ADDITION_TEMPLATES: tuple[str, ...] = (
    "Q: what is {a} plus {b}?\nA:",
    "Q: what is the sum of {a} and {b}?\nA:",
    "Q: add {a} and {b}.\nA:",
)

#: Default sizes of the built-in datasets (rows).
DEFAULT_ROWS: dict[Role, int] = {"eval": 300, "calibration": 128, "reference": 500}
#: Fixed seeds of the built-in datasets, distinct from any seed used in training.
DATASET_SEEDS: dict[Role, int] = {"eval": 1001, "calibration": 2002, "reference": 3003}

_NAMES = ("anna", "ben", "carla", "dev", "emma", "felix", "gina", "hugo", "ida", "jon")
_NOUNS = (
    "cat",
    "dog",
    "bird",
    "child",
    "teacher",
    "farmer",
    "robot",
    "river",
    "tree",
    "house",
    "apple",
    "book",
    "ship",
    "city",
    "garden",
    "horse",
    "song",
    "letter",
    "window",
    "road",
)
_ADJECTIVES = (
    "small",
    "big",
    "red",
    "green",
    "old",
    "young",
    "quiet",
    "happy",
    "bright",
    "cold",
    "warm",
    "slow",
    "fast",
    "tall",
    "dark",
)
_VERBS = ("sees", "likes", "finds", "follows", "helps", "paints", "reads", "carries", "watches", "visits")
#: Shares of the pre-training documents. Addition dominates: only the ~4 answer tokens of each
#: 12-token fact teach addition, and the skill needs ~1 M tokens to emerge on this model size.
PRETRAIN_MIX: dict[str, float] = {"addition": 0.65, "sentence": 0.20, "question": 0.15}

_PLACES = ("in the garden", "near the river", "in the city", "by the road", "at the house", "under the tree")


@lru_cache(maxsize=1)
def _pools() -> dict[Split, tuple[tuple[int, int], ...]]:
    """Ordered operand pairs of each split; both orders of an unordered pair share a split."""
    unordered = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    random.Random(_PARTITION_SEED).shuffle(unordered)
    pools: dict[Split, tuple[tuple[int, int], ...]] = {}
    start = 0
    for i, (split, share) in enumerate(_POOL_SHARES.items()):
        end = len(unordered) if i == len(_POOL_SHARES) - 1 else start + round(share * len(unordered))
        ordered = {(a, b) for a, b in unordered[start:end]} | {(b, a) for a, b in unordered[start:end]}
        pools[split] = tuple(sorted(ordered))
        start = end
    return pools


def operand_pairs(split: Split) -> tuple[tuple[int, int], ...]:
    """All ordered ``(a, b)`` operand pairs of ``split`` (sorted; the pools are disjoint)."""
    return _pools()[split]


def _sentence(rng: random.Random) -> str:
    """One simple grammatical sentence; numbers appear as words-in-context, not only in sums."""
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"the {rng.choice(_NOUNS)}."
        )
    if kind == 1:
        return f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}."
    if kind == 2:
        return f"{rng.choice(_NAMES)} has {rng.randint(2, 99)} {rng.choice(_NOUNS)}s {rng.choice(_PLACES)}."
    return f"the {rng.choice(_NOUNS)} is {rng.choice(_ADJECTIVES)} and {rng.choice(_ADJECTIVES)}."


#: Surface forms of an addition fact and their weights. Symbolic facts are the shortest (12 tokens)
#: and teach the skill; the word forms put the answer at other offsets from the operands, so the
#: model learns to find operands by content, which a small LoRA can then point at a question.
EQUATION_FORMS: dict[str, float] = {
    "{a} + {b} = {c}": 0.6,
    "{a} plus {b} equals {c}.": 0.2,
    "the sum of {a} and {b} is {c}.": 0.2,
}


def _equation(rng: random.Random, train_pairs: tuple[tuple[int, int], ...]) -> str:
    """An addition fact over training-pool pairs, in one of ``EQUATION_FORMS``."""
    a, b = rng.choice(train_pairs)
    form = rng.choices(list(EQUATION_FORMS), weights=list(EQUATION_FORMS.values()))[0]
    return form.format(a=a, b=b, c=a + b)


#: Kinds of non-addition questions and their weights (see ``_other_question``).
QUESTION_KINDS: dict[str, float] = {
    "successor": 1.0,
    "larger": 1.0,
    "minus": 1.0,
    "larger_of": 0.0,
    "smaller_of": 0.0,
    "pick_larger": 0.0,
    "symbolic_sum": 0.0,
    "verbose_sum": 0.0,
}


def _other_question(rng: random.Random) -> str:
    """Questions in the instruction format that are *not* addition: the base model learns the
    ``Q:``/``A:`` layout from these, but never sees an addition question answered."""
    kind = rng.choices(list(QUESTION_KINDS), weights=list(QUESTION_KINDS.values()))[0]
    a, b = rng.sample(range(MAX_OPERAND + 1), 2)
    if kind == "successor":
        n = rng.randint(0, 198)
        return f"Q: what comes after {n}?\nA: {n + 1}"
    if kind == "larger":
        return f"Q: which is larger, {a} or {b}?\nA: {max(a, b)}"
    if kind == "minus":
        return f"Q: what is {max(a, b)} minus {min(a, b)}?\nA: {max(a, b) - min(a, b)}"
    if kind == "larger_of":
        return f"Q: what is the larger of {a} and {b}?\nA: {max(a, b)}"
    if kind == "smaller_of":
        return f"Q: what is the smaller of {a} and {b}?\nA: {min(a, b)}"
    if kind == "pick_larger":
        return f"Q: pick the larger of {a} and {b}.\nA: {max(a, b)}"
    if kind == "symbolic_sum":
        a, b = rng.choice(operand_pairs("train"))
        return f"Q: {a} + {b} = ?\nA: {a + b}"
    if kind == "verbose_sum":
        a, b = rng.choice(operand_pairs("train"))
        return f"{rng.choice(ADDITION_TEMPLATES).format(a=a, b=b)} the answer is {a + b}."
    raise ValueError(f"unknown question kind {kind!r}")


def pretrain_lines(n: int, seed: int) -> list[str]:
    """``n`` pre-training documents: 65% addition facts, 20% sentences, 15% other questions.

    Most documents are one line; the question documents are ``"Q: ...\\nA: ..."`` (two lines).
    Addition facts use training-pool operand pairs only, never eval or reference pairs.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"pretrain:{seed}")
    train_pairs = operand_pairs("train")
    lines: list[str] = []
    for _ in range(n):
        u = rng.random()
        if u < PRETRAIN_MIX["addition"]:
            lines.append(_equation(rng, train_pairs))
        elif u < PRETRAIN_MIX["addition"] + PRETRAIN_MIX["sentence"]:
            lines.append(_sentence(rng))
        else:
            lines.append(_other_question(rng))
    return lines


def instruction_examples(n: int, seed: int, split: Split) -> list[tuple[str, str]]:
    """``n`` addition questions ``(prompt, answer)`` from the operand pool of ``split``.

    ``prompt`` ends where the answer begins (``"...\\nA:"``); ``answer`` is the exact completion
    without the leading space (``"19"``). Within one call, operand pairs are drawn without
    replacement while the pool lasts (eval rows are distinct questions), then with replacement.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split not in _POOL_SHARES:
        raise ValueError(f"split must be one of {sorted(_POOL_SHARES)}, got {split!r}")
    rng = random.Random(f"instruction:{split}:{seed}")
    pool = operand_pairs(split)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pairs.extend(rng.sample(pool, min(n - len(pairs), len(pool))))
    return [(rng.choice(ADDITION_TEMPLATES).format(a=a, b=b), str(a + b)) for a, b in pairs]


def demo_dataset(role: Role, n: int | None = None) -> pd.DataFrame:
    """The built-in dataset of a role.

    * ``eval``: columns ``prompt``, ``answer`` (300 rows by default), held-out operand pairs.
    * ``calibration``: column ``prompt`` (128 rows), questions from the calibration pool.
    * ``reference``: column ``prompt`` (500 rows), the production-traffic baseline the monitor
      compares served prompts with: the same templates and operand distribution as ``eval``.
    """
    if role not in DEFAULT_ROWS:
        raise ValueError(f"role must be one of {sorted(DEFAULT_ROWS)}, got {role!r}")
    rows = DEFAULT_ROWS[role] if n is None else n
    examples = instruction_examples(rows, DATASET_SEEDS[role], role)
    if role == "eval":
        return pd.DataFrame({"prompt": [p for p, _ in examples], "answer": [a for _, a in examples]})
    return pd.DataFrame({"prompt": [p for p, _ in examples]})
