"""The built-in demo corpus and model: formats, splits, caching, loading and determinism.

Training uses ``train_steps=20`` (about 10 s on 2 cores) instead of the default 1,200-step run, so
these tests check the machinery, not the accuracy (the default run records that in its metadata).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from lockgate.tasks.demo.corpus import (
    ADDITION_TEMPLATES,
    EQUATION_FORMS,
    PRETRAIN_MIX,
    demo_dataset,
    instruction_examples,
    operand_pairs,
    pretrain_lines,
)
from lockgate.tasks.demo.model import (
    ADAPTER_DIR,
    BASE_DIR,
    METADATA_FILE,
    demo_model_key,
    ensure_demo_model,
)

QUICK_STEPS = 20
SPLITS = ("train", "eval", "calibration", "reference")
_FACT = re.compile(r"(\d+) \+ (\d+) = (\d+)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def model_dir(cache_dir: Path) -> Path:
    return ensure_demo_model(cache_dir, train_steps=QUICK_STEPS)


def _operands(prompt: str) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", prompt))
    return a, b


# ------------------------------------------------------------------------------------------ corpus
def test_corpus_is_deterministic() -> None:
    assert pretrain_lines(200, seed=0) == pretrain_lines(200, seed=0)
    assert pretrain_lines(200, seed=0) != pretrain_lines(200, seed=1)
    assert instruction_examples(50, 0, "train") == instruction_examples(50, 0, "train")
    assert instruction_examples(50, 0, "eval") != instruction_examples(50, 1, "eval")
    assert demo_dataset("eval").equals(demo_dataset("eval"))


def test_pretrain_lines_mix_and_facts_are_correct() -> None:
    lines = pretrain_lines(2000, seed=3)
    assert len(lines) == 2000
    facts = [m for line in lines if (m := _FACT.fullmatch(line))]
    assert all(int(a) + int(b) == int(c) for a, b, c in (m.groups() for m in facts))
    # Symbolic facts are one addition form: expect their share of the mix, within sampling noise.
    expected = 2000 * PRETRAIN_MIX["addition"] * EQUATION_FORMS["{a} + {b} = {c}"]
    assert 0.8 * expected < len(facts) < 1.2 * expected
    assert any(line.endswith(".") and not line[0].isdigit() and "\n" not in line for line in lines)
    assert any(re.fullmatch(r"Q: what comes after \d+\?\nA: \d+", line) for line in lines)


def test_pretraining_answers_addition_questions_only_chattily() -> None:
    """The base model sees addition questions answered correctly but never in the terse format the
    evaluation scores; that format is what post-training teaches."""
    addition_prompts = tuple(t.split("{a}")[0] for t in ADDITION_TEMPLATES)
    questions = [line for line in pretrain_lines(3000, seed=0) if line.startswith(addition_prompts)]
    assert len(questions) > 300
    for line in questions:
        prompt, reply = line.split("\n")
        a, b = _operands(prompt)
        assert reply == f"A: {a + b}, because {a} plus {b} equals {a + b}."
        assert not re.fullmatch(r"A: \d+", reply)


def test_operand_pools_are_disjoint_on_unordered_pairs() -> None:
    pools = {split: operand_pairs(split) for split in SPLITS}
    unordered = {split: {tuple(sorted(p)) for p in pairs} for split, pairs in pools.items()}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            assert not unordered[first] & unordered[second], (first, second)
    assert sum(len(pairs) for pairs in pools.values()) == 100 * 100


def test_no_held_out_pair_reaches_training() -> None:
    held_out = {p for split in ("eval", "calibration", "reference") for p in operand_pairs(split)}
    seen = set()
    for line in pretrain_lines(5000, seed=0):
        numbers = [int(n) for n in re.findall(r"\d+", line)]
        if _FACT.fullmatch(line) or "plus" in line or "sum of" in line or line.startswith("Q: add"):
            seen.add((numbers[0], numbers[1]))
    seen |= {_operands(p) for p, _ in instruction_examples(6000, 0, "train")}
    assert len(seen) > 1000
    assert not seen & held_out


def test_instruction_format() -> None:
    examples = instruction_examples(300, 7, "eval")
    for prompt, answer in examples:
        assert prompt.startswith("Q: ")
        assert prompt.endswith("\nA:")
        assert answer == answer.strip() and answer.isdigit()
        assert int(answer) == sum(_operands(prompt))
    assert len({p for p, _ in examples}) == 300  # distinct questions while the pool lasts
    used = {p.split(str(_operands(p)[0]))[0] for p, _ in examples}
    assert used == {t.split("{a}")[0] for t in ADDITION_TEMPLATES}


@pytest.mark.parametrize(
    ("role", "rows", "columns"),
    [("eval", 300, ["prompt", "answer"]), ("calibration", 128, ["prompt"]), ("reference", 500, ["prompt"])],
)
def test_demo_dataset_shapes(role: str, rows: int, columns: list[str]) -> None:
    frame = demo_dataset(role)  # type: ignore[arg-type]
    assert frame.shape == (rows, len(columns))
    assert list(frame.columns) == columns
    assert frame["prompt"].str.endswith("\nA:").all()
    assert len(demo_dataset(role, n=10)) == 10  # type: ignore[arg-type]


def test_eval_prompts_are_not_trained_or_reused() -> None:
    evals = set(demo_dataset("eval")["prompt"])
    assert not evals & set(demo_dataset("reference")["prompt"])
    assert not evals & set(demo_dataset("calibration")["prompt"])
    assert not evals & {p for p, _ in instruction_examples(6000, 0, "train")}


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="split"):
        instruction_examples(3, 0, "test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        demo_dataset("test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train_steps"):
        ensure_demo_model(Path("unused"), train_steps=0)


# ------------------------------------------------------------------------------------------- model
def test_cache_key_covers_steps_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import lockgate.tasks.demo.model as demo_model

    key = demo_model_key(QUICK_STEPS)
    assert key == demo_model_key(QUICK_STEPS)
    assert key != demo_model_key(QUICK_STEPS + 1)
    assert key != demo_model_key(None)
    monkeypatch.setattr(demo_model, "CODE_VERSION", demo_model.CODE_VERSION + "-changed")
    assert key != demo_model_key(QUICK_STEPS)


def test_model_folder_loads_and_generates(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert model_dir.name == f"demo-model-{demo_model_key(QUICK_STEPS)[:12]}"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.config.tie_word_embeddings
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>", "<s>", "</s>", "<pad>"
    )  # fmt: skip
    prompt, answer = demo_dataset("eval", n=1).iloc[0]
    encoded = tokenizer(prompt, return_tensors="pt")
    assert encoded["input_ids"][0, 0].item() == tokenizer.bos_token_id
    # Training tokenizes prompt and answer apart; the joint text must start with the same tokens.
    joint = tokenizer(f"{prompt} {answer}\n")["input_ids"]
    assert joint[: encoded["input_ids"].shape[1]] == encoded["input_ids"][0].tolist()
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > encoded["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_metadata_records_training(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    meta = json.loads((model_dir / METADATA_FILE).read_text())
    assert meta["train_steps"] == QUICK_STEPS
    assert meta["lora_steps"] >= 5
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert 1_000_000 < meta["parameters"] < 10_000_000
    assert 0.0 <= meta["exact_match_base"] <= 1.0
    assert 0.0 <= meta["exact_match_post_trained"] <= 1.0
    assert meta["pretrain_loss_final"] < meta["pretrain_loss_first"]
    assert {"tokenizer", "pretrain", "lora", "total"} <= set(meta["timings_s"])


def test_second_call_reuses_cache(model_dir: Path, cache_dir: Path) -> None:
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    again = ensure_demo_model(cache_dir, train_steps=QUICK_STEPS)
    assert again == model_dir
    assert time.perf_counter() - started < 5.0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # Atomic write: no temporary sibling is left behind (the hidden .lock file stays on purpose).
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == [model_dir.name]


def test_adapter_loads_with_peft_and_matches_merged(model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert Path(config["base_model_name_or_path"]) == (model_dir / BASE_DIR).resolve()

    base = AutoModelForCausalLM.from_pretrained(model_dir / BASE_DIR)
    adapted = PeftModel.from_pretrained(base, model_dir / ADAPTER_DIR).eval()
    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(demo_dataset("eval", n=1)["prompt"].iloc[0], return_tensors="pt")
    with torch.no_grad():
        adapted_logits, merged_logits = adapted(**batch).logits, merged(**batch).logits
    assert torch.allclose(adapted_logits, merged_logits, atol=1e-4)
    # The adapter was trained: peft starts every lora_B at zero.
    assert any(float(p.abs().sum()) > 0 for name, p in adapted.named_parameters() if "lora_B" in name)


def test_training_is_deterministic_and_silent(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    first = ensure_demo_model(tmp_path / "a", train_steps=2)
    second = ensure_demo_model(tmp_path / "b", train_steps=2)
    assert capfd.readouterr().out == ""  # progress goes to the logger, never to stdout

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert first.name == second.name
    assert digest(first) == digest(second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_train_role_is_labelled_and_disjoint_from_eval() -> None:
    train, evals = demo_dataset("train"), demo_dataset("eval")
    assert list(train.columns) == ["prompt", "answer"] and len(train) == 2000
    assert all(str(sum(_operands(p))) == a for p, a in zip(train.prompt, train.answer, strict=True))
    assert not {_operands(p) for p in train.prompt} & {_operands(p) for p in evals.prompt}
