"""The small world the built-in demo model is trained and evaluated on: two-digit addition.

The evaluation asks ``"Q: what is 12 plus 7?\\nA:"`` and expects exactly ``"19"`` (the first line of
the continuation, stripped). The corpus splits the work the way real post-training does:

* **Pre-training** (``pretrain_lines``) teaches the skill: addition facts (``"12 + 7 = 19"`` and two
  wordings), simple sentences, and questions. The addition questions are answered *chattily*
  (``" 19, because 12 plus 7 equals 19."``), as a base model that has read the web would: the sum
  is right, but the answer line never equals ``"19"``, so the base model scores ~0 exact match.
* **Post-training** (``instruction_examples``, split ``train``) teaches the answer format: the
  number, then a newline. The LoRA adapter only has to learn where to stop, so it trains in
  seconds, and the post-trained accuracy is the skill the base model learned.

Operand pairs are partitioned once into disjoint pools (train / eval / calibration / reference) on
the *unordered* pair, so neither ``12 + 7`` nor ``7 + 12`` of an eval question appears anywhere in
training: exact match measures generalised addition, not memorised facts.

Everything is a pure function of its arguments: ``random.Random`` seeded with a string (hashed with
SHA-512, not Python's salted ``hash``), so draws are the same on every run and machine.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Literal

import pandas as pd

Split = Literal["train", "eval", "calibration", "reference"]
Role = Literal["train", "eval", "calibration", "reference"]

#: Operands are 0..99: one- and two-digit addition with sums up to 198.
MAX_OPERAND = 99
#: Shares of the 5,050 unordered pairs. Eval, calibration and reference pairs are never trained on.
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
DEFAULT_ROWS: dict[Role, int] = {"train": 2000, "eval": 300, "calibration": 128, "reference": 500}
#: Fixed seeds of the built-in datasets.
DATASET_SEEDS: dict[Role, int] = {"train": 4004, "eval": 1001, "calibration": 2002, "reference": 3003}

#: Shares of the pre-training documents. Addition facts dominate because the skill is what costs
#: compute: on the 1 M-parameter model it emerges after ~600-900 steps of 1,536 tokens.
PRETRAIN_MIX: dict[str, float] = {"addition": 0.55, "sentence": 0.10, "question": 0.35}
#: Surface forms of an addition fact. Symbolic facts are the shortest (12 tokens, a quarter of
#: them the answer) and teach the skill fastest; the wordings tie "plus" and "sum" to it.
EQUATION_FORMS: dict[str, float] = {
    "{a} + {b} = {c}": 0.8,
    "{a} plus {b} equals {c}.": 0.1,
    "the sum of {a} and {b} is {c}.": 0.1,
}
#: Kinds of pre-training questions. Successor and comparison questions show the terse ``A: <n>``
#: format on other tasks; addition questions are answered chattily (see the module docstring).
QUESTION_KINDS: dict[str, float] = {"successor": 1.0, "larger": 1.0, "chatty_addition": 5.0}

_NAMES = ("anna", "ben", "carla", "dev", "emma", "felix", "gina", "hugo", "ida", "jon")
_NOUNS = (
    "cat", "dog", "bird", "child", "teacher", "farmer", "robot", "river", "tree", "house",
    "apple", "book", "ship", "city", "garden", "horse", "song", "letter", "window", "road",
)  # fmt: skip
_ADJECTIVES = (
    "small", "big", "red", "green", "old", "young", "quiet", "happy", "bright", "cold",
    "warm", "slow", "fast", "tall", "dark",
)  # fmt: skip
_VERBS = ("sees", "likes", "finds", "follows", "helps", "paints", "reads", "carries", "watches", "visits")
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
        chunk = unordered[start:end]
        pools[split] = tuple(sorted({(a, b) for a, b in chunk} | {(b, a) for a, b in chunk}))
        start = end
    return pools


def operand_pairs(split: Split) -> tuple[tuple[int, int], ...]:
    """All ordered ``(a, b)`` operand pairs of ``split`` (sorted; the pools are disjoint)."""
    if split not in _POOL_SHARES:
        raise ValueError(f"split must be one of {sorted(_POOL_SHARES)}, got {split!r}")
    return _pools()[split]


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _sentence(rng: random.Random) -> str:
    """One simple grammatical sentence, so perplexity on plain text means something."""
    kind = rng.randrange(4)
    if kind == 0:
        adjective, noun, verb, other = (
            rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS)
        )  # fmt: skip
        return f"the {adjective} {noun} {verb} the {other}."
    if kind == 1:
        return f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}."
    if kind == 2:
        return f"{rng.choice(_NAMES)} has {rng.randint(2, 99)} {rng.choice(_NOUNS)}s {rng.choice(_PLACES)}."
    return f"the {rng.choice(_NOUNS)} is {rng.choice(_ADJECTIVES)} and {rng.choice(_ADJECTIVES)}."


def _equation(rng: random.Random, train_pairs: tuple[tuple[int, int], ...]) -> str:
    """An addition fact over training-pool pairs, in one of ``EQUATION_FORMS``."""
    a, b = rng.choice(train_pairs)
    return _pick(rng, EQUATION_FORMS).format(a=a, b=b, c=a + b)


def _question(rng: random.Random, train_pairs: tuple[tuple[int, int], ...]) -> str:
    """A two-line ``"Q: ...\\nA: ..."`` document of one of ``QUESTION_KINDS``."""
    kind = _pick(rng, QUESTION_KINDS)
    a, b = rng.sample(range(MAX_OPERAND + 1), 2)
    if kind == "successor":
        n = rng.randint(0, 2 * MAX_OPERAND)
        return f"Q: what comes after {n}?\nA: {n + 1}"
    if kind == "larger":
        return f"Q: which is larger, {a} or {b}?\nA: {max(a, b)}"
    if kind == "chatty_addition":
        a, b = rng.choice(train_pairs)
        prompt = rng.choice(ADDITION_TEMPLATES).format(a=a, b=b)
        return f"{prompt} {a + b}, because {a} plus {b} equals {a + b}."
    raise ValueError(f"unknown question kind {kind!r}")


def pretrain_lines(n: int, seed: int) -> list[str]:
    """``n`` pre-training documents drawn by ``PRETRAIN_MIX`` (55% addition facts, 10% sentences,
    35% questions).

    Facts and sentences are one line; questions are ``"Q: ...\\nA: ..."`` (two lines). Addition
    uses training-pool operand pairs only, never eval, calibration or reference pairs.
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
            lines.append(_question(rng, train_pairs))
    return lines


def instruction_examples(n: int, seed: int, split: Split) -> list[tuple[str, str]]:
    """``n`` addition questions ``(prompt, answer)`` over the operand pool of ``split``.

    ``prompt`` ends where the answer begins (``"...\\nA:"``); ``answer`` is the exact completion
    without the leading space (``"19"``); a model should generate ``" 19"`` then a newline or EOS.
    Operand pairs are drawn without replacement while the pool lasts (eval rows are distinct
    questions), then with replacement.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = operand_pairs(split)
    rng = random.Random(f"instruction:{split}:{seed}")
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pairs.extend(rng.sample(pool, min(n - len(pairs), len(pool))))
    return [(rng.choice(ADDITION_TEMPLATES).format(a=a, b=b), str(a + b)) for a, b in pairs]


def demo_dataset(role: Role, n: int | None = None) -> pd.DataFrame:
    """The built-in dataset of a role.

    * ``train``: columns ``prompt``, ``answer`` (2,000 rows), training-pool questions for the
      compression steps that train (qat, distill, recover).
    * ``eval``: columns ``prompt``, ``answer`` (300 rows by default), held-out operand pairs.
    * ``calibration``: column ``prompt`` (128 rows), questions over the calibration pool.
    * ``reference``: column ``prompt`` (500 rows), the production-traffic baseline the monitor
      compares served prompts with: the same templates and operand distribution as ``eval``.
    """
    if role not in DEFAULT_ROWS:
        raise ValueError(f"role must be one of {sorted(DEFAULT_ROWS)}, got {role!r}")
    rows = DEFAULT_ROWS[role] if n is None else n
    examples = instruction_examples(rows, DATASET_SEEDS[role], role)
    if role in ("eval", "train"):
        return pd.DataFrame({"prompt": [p for p, _ in examples], "answer": [a for _, a in examples]})
    return pd.DataFrame({"prompt": [p for p, _ in examples]})
