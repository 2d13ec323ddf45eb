"""The distill, prune and recover steps on a tiny random Llama (4 heads, 2 KV heads, 2 blocks).

Each test asserts a real effect: the student's loss falls and it has fewer blocks, pruning reaches
its target and the tensors shrink, recovery lowers the loss and leaves no LoRA module behind, and
bad recipes are refused by the named check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lockgate.flows.spec import CandidateSpec, DistillStep, PruneStep, RecoverStep
from lockgate.tasks.compression import distill, prune, recover
from lockgate.tasks.compression.base import StepContext
from lockgate.tasks.platform.errors import StageFailed

# Same phrasing as the tiny tokenizer's training lines, so the rows tokenize into few tokens.
PAIRS = tuple((f"Q: what is {a} plus {b}?\nA:", str(a + b)) for a in range(24) for b in range(6))


@pytest.fixture(scope="module")
def context(tiny_llm_dir: Path) -> StepContext:
    return StepContext(
        parent=tiny_llm_dir,
        calibration_prompts=tuple(p for p, _ in PAIRS[::3]),
        train_pairs=PAIRS,
    )


def _load(folder: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval()


def _finite_logits(folder: Path) -> torch.Tensor:
    model = _load(folder)
    ids = AutoTokenizer.from_pretrained(folder)(["Q: what is 3 plus 4?\nA:"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    return logits


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------- distill
def test_soft_label_kl_is_teacher_to_student_and_scaled_by_t_squared() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    t = 4.0
    p_t = torch.softmax(teacher / t, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t**2
    got = distill.soft_label_kl(student, teacher, t)
    assert got == pytest.approx(float(expected), rel=1e-5)
    # Direction matters: KL(p_s || p_t) is a different number.
    assert float(distill.soft_label_kl(teacher, student, t)) != pytest.approx(float(got), rel=1e-3)
    assert float(distill.soft_label_kl(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_distill_trains_a_half_depth_student_whose_loss_falls(context: StepContext, tmp_path: Path) -> None:
    step = DistillStep(steps=25, batch_size=8, lr=3e-3)
    outcome = distill.apply(context.parent, tmp_path / "student", step, context)

    assert outcome.metrics["loss_after"] < outcome.metrics["loss_before"]
    assert outcome.metrics["ce_after"] < outcome.metrics["ce_before"]
    student, teacher = _load(outcome.folder), _load(context.parent)
    assert student.config.num_hidden_layers == 1 < teacher.config.num_hidden_layers
    assert _params(student) < _params(teacher)
    assert outcome.report["init"] == "teacher_blocks"
    assert outcome.report["layer_map"] == [1]  # the last of the teacher's two blocks
    _finite_logits(outcome.folder)


@pytest.mark.parametrize(
    ("weights", "term"),
    [
        ({"beta": 1.0}, "kl"),
        ({"beta": 0.0, "hidden_alignment": 1.0}, "hidden"),
        ({"beta": 0.0, "attention_alignment": 1.0}, "attention"),
    ],
)
def test_each_teacher_signal_alone_teaches_a_narrow_student(
    context: StepContext, tmp_path: Path, weights: dict, term: str
) -> None:
    # alpha=0: no hard labels; the student learns only from the one teacher signal under test.
    step = DistillStep(hidden_ratio=0.5, alpha=0.0, steps=20, batch_size=8, lr=3e-3, **weights)
    outcome = distill.apply(context.parent, tmp_path / "narrow", step, context)

    before, after = outcome.report["before"], outcome.report["after"]
    assert after[term] < before[term]
    assert after["loss"] < before["loss"]
    student = _load(outcome.folder)
    assert student.config.hidden_size == 32  # 64 x 0.5, randomly initialised
    assert student.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    assert outcome.report["init"] == "random"
    _finite_logits(outcome.folder)


def test_teacher_cache_gives_a_rows_logits_in_any_batch(context: StepContext) -> None:
    """A row cached from one batch is the same soft label (to float16) in another batch of other
    lengths: right padding keeps each row's logits its own."""
    from lockgate.tasks.compression.training import collate, encode_pairs, pad_id_of

    teacher = _load(context.parent)
    tokenizer = AutoTokenizer.from_pretrained(context.parent)
    rows, pad = encode_pairs(tokenizer, PAIRS[:12]), pad_id_of(tokenizer)
    step = DistillStep()
    cache = distill.TeacherCache(1 << 30)
    first, second = [0, 1, 2, 3], [4, 5, 6, 7]
    cache.outputs(teacher, collate([rows[i] for i in first], pad), first, step)
    cache.outputs(teacher, collate([rows[i] for i in second], pad), second, step)
    mixed = [6, 0, 3, 5]  # another composition, another padded width
    batch = collate([rows[i] for i in mixed], pad)
    cached = cache.outputs(teacher, batch, mixed, step).logits
    with torch.no_grad():
        fresh = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    assert cached.dtype == torch.float16
    assert torch.allclose(cached[mask].float(), fresh[mask], rtol=2e-3, atol=2e-3)
    assert cache.report()["row_hits"] == 4 and cache.report()["rows_cached"] == 8
    assert distill.TeacherCache(0).outputs(teacher, batch, mixed, step).logits.dtype == torch.float32


def test_batches_are_grouped_by_length_within_one_epoch() -> None:
    from lockgate.tasks.compression.training import Encoded, endless_index_batches

    lengths = [3 + (7 * i) % 40 for i in range(64)]
    rows = [Encoded(tuple(range(n)), 0) for n in lengths]
    batches = endless_index_batches(rows, batch_size=8, seed=0)
    epoch = [next(batches) for _ in range(8)]
    assert sorted(i for batch in epoch for i in batch) == list(range(64))  # every row once
    padded = sum(8 * max(lengths[i] for i in batch) for batch in epoch)
    assert padded < 1.15 * sum(lengths)  # sorted within the epoch (random batches: ~1.7x)
    assert all(len(set(batch)) == 8 for batch in epoch)
    few = endless_index_batches(rows[:5], batch_size=8, seed=0)  # fewer rows than a batch
    assert all(sorted(set(next(few))) == list(range(5)) for _ in range(3))


def test_distill_reuses_cached_teacher_logits_in_later_epochs(context: StepContext, tmp_path: Path) -> None:
    step = DistillStep(steps=24, batch_size=16, lr=3e-3)  # 192 rows: two epochs
    outcome = distill.apply(context.parent, tmp_path / "student", step, context)
    cache = outcome.report["teacher_cache"]
    rows = outcome.report["rows"]["labelled"] + outcome.report["rows"]["unlabelled"]
    assert cache["rows_cached"] == rows and cache["row_hits"] > 0
    assert cache["row_hits"] == cache["row_misses"] == 12 * 16  # the second epoch from the cache
    assert outcome.metrics["loss_after"] < outcome.metrics["loss_before"]
    assert outcome.report["padding_share"] < 0.2


def test_distill_refuses_a_student_folder_that_does_not_exist(context: StepContext, tmp_path: Path) -> None:
    step = DistillStep(student=str(tmp_path / "missing"), steps=1)
    with pytest.raises(StageFailed, match=r"distill\.student"):
        distill.apply(context.parent, tmp_path / "out", step, context)


# ---------------------------------------------------------------------------------------- prune
def _prune(context: StepContext, out: Path, **params: object):
    return prune.apply(context.parent, out, PruneStep(**params), context)


def test_unstructured_reaches_the_sparsity_and_says_it_is_not_faster(
    context: StepContext, tmp_path: Path
) -> None:
    outcome = _prune(context, tmp_path / "u", structure="unstructured", sparsity=0.6)

    model = _load(outcome.folder)
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    assert zeros / total == pytest.approx(0.6, abs=1e-3)
    assert outcome.metrics["sparsity"] == pytest.approx(zeros / total)
    # The shapes stay: no parameter is removed, and the report says dense matmuls do not speed up.
    assert outcome.metrics["params_after"] == outcome.metrics["params_before"]
    assert outcome.report["sparsity_of_all_parameters"] < outcome.report["sparsity_of_block_linears"]
    assert "do not improve" in outcome.report["caveat"]
    _finite_logits(outcome.folder)


def test_magnitude_zeroes_exactly_the_smallest_weights(context: StepContext, tmp_path: Path) -> None:
    outcome = _prune(context, tmp_path / "m", structure="unstructured", sparsity=0.5)

    original = dict(_load(context.parent).named_parameters())
    pruned = dict(_load(outcome.folder).named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    before, after = original[name].detach().abs(), pruned[name].detach()
    removed, kept = before[after == 0], before[after != 0]
    assert removed.numel() == before.numel() // 2
    assert float(removed.max()) <= float(kept.min())


def test_importance_kinds_choose_different_weights(context: StepContext, tmp_path: Path) -> None:
    masks = {}
    for kind in ("magnitude", "gradient", "taylor"):
        outcome = _prune(context, tmp_path / kind, structure="unstructured", sparsity=0.5, importance=kind)
        weight = _load(outcome.folder).model.layers[0].self_attn.q_proj.weight
        masks[kind] = weight == 0
        assert outcome.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not torch.equal(masks["magnitude"], masks["gradient"])
    assert not torch.equal(masks["magnitude"], masks["taylor"])
    assert not torch.equal(masks["gradient"], masks["taylor"])


def test_gradient_importance_without_data_is_refused(tiny_llm_dir: Path, tmp_path: Path) -> None:
    empty = StepContext(parent=tiny_llm_dir, calibration_prompts=(), train_pairs=())
    with pytest.raises(StageFailed, match=r"prune\.importance"):
        prune.apply(tiny_llm_dir, tmp_path / "g", PruneStep(importance="taylor"), empty)


def test_head_pruning_removes_whole_kv_groups(context: StepContext, tmp_path: Path) -> None:
    outcome = _prune(context, tmp_path / "h", structure="heads", sparsity=0.5, importance="taylor")

    model = _load(outcome.folder)
    config = model.config
    # 4 query heads in 2 KV groups of 2: half the groups go, with their query heads.
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32)
    assert outcome.metrics["params_after"] < outcome.metrics["params_before"]
    assert outcome.metrics["sparsity"] == 0.5
    assert outcome.metrics["reload_max_abs_diff"] == 0.0
    _finite_logits(outcome.folder)


def test_head_pruning_keeps_the_most_important_group(context: StepContext, tmp_path: Path) -> None:
    outcome = _prune(context, tmp_path / "hm", structure="heads", sparsity=0.5)

    original = _load(context.parent).model.layers[1].self_attn
    kept = _load(outcome.folder).model.layers[1].self_attn
    removed = outcome.report["removed_units_per_layer"][1][0]
    survivor = 1 - removed
    # The surviving group's K head is the original K rows of that group, untouched.
    assert torch.equal(kept.k_proj.weight, original.k_proj.weight[survivor * 16 : (survivor + 1) * 16])

    def group_l1(g: int) -> float:
        q = original.q_proj.weight[g * 32 : (g + 1) * 32].abs().sum()
        o = original.o_proj.weight[:, g * 32 : (g + 1) * 32].abs().sum()
        k = original.k_proj.weight[g * 16 : (g + 1) * 16].abs().sum()
        v = original.v_proj.weight[g * 16 : (g + 1) * 16].abs().sum()
        return float((q + o + k + v).detach())

    assert group_l1(removed) <= group_l1(survivor)


def test_mlp_neuron_pruning_shrinks_the_mlp(context: StepContext, tmp_path: Path) -> None:
    outcome = _prune(context, tmp_path / "n", structure="mlp_neurons", sparsity=0.25, importance="gradient")

    model = _load(outcome.folder)
    assert model.config.intermediate_size == 96  # 128 x 0.75
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (96, 64)
    assert mlp.down_proj.weight.shape == (64, 96)
    assert outcome.metrics["sparsity"] == 0.25
    assert outcome.metrics["params_after"] < outcome.metrics["params_before"]
    _finite_logits(outcome.folder)


def test_layer_pruning_drops_blocks(context: StepContext, tmp_path: Path) -> None:
    outcome = _prune(context, tmp_path / "l", structure="layers", sparsity=0.5)

    model = _load(outcome.folder)
    assert model.config.num_hidden_layers == len(model.model.layers) == 1
    assert outcome.report["removed_layers"] in ([0], [1])
    assert outcome.metrics["param_ratio"] < 0.75
    _finite_logits(outcome.folder)


# -------------------------------------------------------------------------------------- recover
def test_recover_lowers_the_loss_and_merges_the_adapter(context: StepContext, tmp_path: Path) -> None:
    pruned = _prune(context, tmp_path / "p", structure="mlp_neurons", sparsity=0.5)
    step = RecoverStep(steps=25, lr=5e-3, batch_size=8)
    outcome = recover.apply(pruned.folder, tmp_path / "r", step, context)

    assert outcome.metrics["loss_after"] < outcome.metrics["loss_before"]
    tensors = load_file(str(outcome.folder / "model.safetensors"))
    assert not [k for k in tensors if "lora" in k]
    assert not (outcome.folder / "adapter_config.json").exists()
    model = _load(outcome.folder)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.config.intermediate_size == 64  # the pruned shape survives recovery
    _finite_logits(outcome.folder)


def test_recover_keeps_unstructured_sparsity(context: StepContext, tmp_path: Path) -> None:
    pruned = _prune(context, tmp_path / "p", structure="unstructured", sparsity=0.5)
    step = RecoverStep(steps=10, lr=5e-3, batch_size=8, target_modules=("q_proj", "v_proj"))
    outcome = recover.apply(pruned.folder, tmp_path / "r", step, context)

    before = _load(pruned.folder).model.layers[0].self_attn.q_proj.weight
    after = _load(outcome.folder).model.layers[0].self_attn.q_proj.weight
    assert torch.equal(before == 0, after == 0)
    assert not torch.equal(before, after)  # the adapter did change the kept weights
    assert "model.layers.0.self_attn.q_proj" in outcome.report["remasked_modules"]


def test_recover_names_target_modules_the_model_lacks(context: StepContext, tmp_path: Path) -> None:
    step = RecoverStep(steps=1, target_modules=("c_attn",))
    with pytest.raises(StageFailed, match=r"recover\.target_modules"):
        recover.apply(context.parent, tmp_path / "r", step, context)


# ----------------------------------------------------------------------------------------- spec
@pytest.mark.parametrize(
    ("steps", "check"),
    [
        ([{"recover": {}}], "recover-needs-damage"),
        ([{"quantize": {}}, {"prune": {}}], "quantized-is-final"),
        ([{"prune": {}}, {"quantize": {}}, {"recover": {}}], "quantized-is-final"),
        ([{"prune": {}}, {"distill": {}}], "distill-first"),
    ],
)
def test_bad_step_orders_name_the_check(steps: list[dict], check: str) -> None:
    with pytest.raises(ValidationError, match=check):
        CandidateSpec(name="c", steps=steps)


def test_good_step_orders_pass() -> None:
    CandidateSpec(name="a", steps=[{"prune": {"structure": "heads"}}, {"recover": {}}, {"quantize": {}}])
    CandidateSpec(name="b", steps=[{"distill": {"layers_ratio": 0.5}}, {"recover": {}}])


@pytest.mark.parametrize(
    ("kind", "params", "field"),
    [
        ("prune", {"sparsity": 1.0}, "sparsity"),
        ("prune", {"structure": "channels"}, "structure"),
        ("prune", {"importance": "random"}, "importance"),
        ("distill", {"temperature": 0}, "temperature"),
        ("distill", {"layers_ratio": 1.0}, "student would be the parent"),
        ("distill", {"student": "/m", "layers_ratio": 0.25}, "either student or layers_ratio"),
        ("distill", {"alpha": 0, "beta": 0}, "nothing to learn from"),
        ("recover", {"target_modules": ["q_proj.*"]}, "target_modules"),
        ("recover", {"r": 0}, "r"),
        ("recover", {"rank": 8}, "rank"),
    ],
)
def test_bad_parameters_name_the_field(kind: str, params: dict, field: str) -> None:
    spec = {"distill": DistillStep, "prune": PruneStep, "recover": RecoverStep}[kind]
    with pytest.raises(ValidationError, match=field):
        spec(**params)


def test_prune_then_recover_chain_through_compress_candidate(context: StepContext, tmp_path: Path) -> None:
    from lockgate.tasks.compress import compress_candidate

    candidate = CandidateSpec(
        name="heads-recovered",
        steps=[
            {"prune": {"structure": "heads", "sparsity": 0.5}},
            {"recover": {"steps": 5, "batch_size": 4}},
        ],
    )
    result = compress_candidate(context.parent, candidate, tmp_path, context)

    assert result.step_kinds == ("prune", "recover")
    assert result.size_ratio < 1
    assert result.metrics["0.prune.sparsity"] == 0.5
    assert "1.recover.loss_after" in result.metrics
    assert _load(result.folder).config.num_attention_heads == 2
    _finite_logits(result.folder)


def test_compress_task_reuses_a_finished_candidate_with_the_same_key(
    context: StepContext, tmp_path: Path, prefect_harness: None
) -> None:
    """A re-run (e.g. after a crashed worker) resumes from the finished candidate instead of redoing it;
    a changed recipe is a different key and is compressed afresh."""
    from prefect import flow

    from lockgate.flows.spec import CandidateSpec
    from lockgate.tasks.compress import compress_task

    spec = {"name": "pruned", "steps": [{"prune": {"structure": "mlp_neurons", "sparsity": 0.5}}]}
    candidate = CandidateSpec.model_validate(spec)

    @flow
    def run(c: CandidateSpec) -> object:
        return compress_task(context.parent, c, tmp_path, context, None)

    first = run(candidate)
    stamp = (first.folder / "model.safetensors").stat().st_mtime_ns
    again = run(candidate)
    assert again.folder == first.folder and again.metrics == first.metrics
    assert (again.folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    changed = CandidateSpec.model_validate(
        {**spec, "steps": [{"prune": {"structure": "mlp_neurons", "sparsity": 0.25}}]}
    )
    other = run(changed)
    assert other.folder != first.folder and other.size_bytes > first.size_bytes
