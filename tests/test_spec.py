"""Golden tests of the spec loader: exact messages, exact 1-based positions, all at once."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lockgate.flows.spec import PipelinesFile
from lockgate.flows.spec_loader import (
    SCHEMA_PATH,
    json_schema,
    json_schema_text,
    load_spec,
    load_spec_text,
    resolved_spec,
    write_json_schema,
)
from lockgate.tasks.platform.errors import SpecError

REPO_ROOT = Path(__file__).resolve().parent.parent
FILE = "p.yaml"

MINIMAL = """\
version: 1
pipelines:
  demo:
    compress:
      candidates:
        - name: int8
          steps:
            - quantize: {bits: 8}
    tracking:
      registered_model: demo-llm
"""


def problems_of(text: str) -> list[str]:
    """The problems ``load_spec_text`` raises for ``text`` (dedented), which must be invalid."""
    with pytest.raises(SpecError) as info:
        load_spec_text(textwrap.dedent(text), FILE)
    return info.value.problems


# ---------------------------------------------------------------------------------- valid specs
def test_minimal_spec_loads_with_defaults() -> None:
    spec = load_spec_text(MINIMAL, FILE)
    name, pipeline = spec.pipeline(None)
    assert name == "demo"
    assert pipeline.compress.candidates[0].steps[0].kind == "quantize"
    assert pipeline.canary.shares == (5, 10, 25, 50, 100)
    assert pipeline.tracking.experiment == "lockgate"


def test_models_are_frozen() -> None:
    pipeline = load_spec_text(MINIMAL, FILE).pipelines["demo"]
    with pytest.raises(ValidationError, match="frozen"):
        pipeline.canary.promote = False  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        pipeline.compress.candidates[0].steps[0].quantize.bits = 4  # type: ignore[misc,union-attr]


def test_round_trip_through_yaml_is_lossless() -> None:
    spec = load_spec_text(MINIMAL, FILE)
    dumped = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    assert load_spec_text(dumped, FILE) == spec


def test_resolved_spec_fills_every_default() -> None:
    resolved = resolved_spec(load_spec_text(MINIMAL, FILE).pipelines["demo"])
    assert resolved["canary"]["thresholds"]["min_success_rate"] == 0.95
    assert resolved["compress"]["candidates"][0]["steps"][0]["quantize"]["ignore"] == [
        "lm_head",
        "*embed*",
        "{first}",
        "{last}",
    ]
    json.dumps(resolved)  # JSON-ready: it is logged with every run


def test_yaml_merge_keys_are_expanded() -> None:
    text = """\
    version: 1
    pipelines:
      demo: &base
        compress: {candidates: [{name: int8, steps: [{quantize: {}}]}]}
        tracking: {registered_model: demo-llm}
      other:
        <<: *base
        description: same recipe
    """
    spec = load_spec_text(textwrap.dedent(text), FILE)
    assert spec.pipelines["other"].compress == spec.pipelines["demo"].compress
    assert spec.pipelines["other"].description == "same recipe"


def test_load_spec_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_spec(path) == load_spec_text(MINIMAL)


# ------------------------------------------------------------------------------ unknown keys
def test_typo_at_pipeline_top_suggests_the_key() -> None:
    assert problems_of(MINIMAL + "    cannary:\n      steps: [5, 100]\n") == [
        "p.yaml:11:5: pipelines.demo.cannary: unknown key 'cannary'; did you mean 'canary'?",
    ]


def test_typo_under_a_gate_suggests_the_key() -> None:
    text = MINIMAL + "    evaluate:\n      gates:\n        perplexity: {max_increse_pct: 5}\n"
    assert problems_of(text) == [
        "p.yaml:13:22: pipelines.demo.evaluate.gates.perplexity.max_increse_pct: "
        "unknown key 'max_increse_pct'; did you mean 'max_increase_pct'?",
    ]


def test_unknown_key_without_a_close_match_lists_the_allowed_keys() -> None:
    assert problems_of(MINIMAL + "    package:\n      batching: {zzz: 1}\n") == [
        "p.yaml:12:18: pipelines.demo.package.batching.zzz: "
        "unknown key 'zzz'; allowed: max_batch_size, max_latency_ms, engine, max_step_tokens",
    ]


def test_unknown_gate_metric_suggests_the_metric() -> None:
    text = MINIMAL + "    evaluate:\n      gates:\n        perplexty: {max_increase_pct: 5}\n"
    assert problems_of(text) == [
        "p.yaml:13:9: pipelines.demo.evaluate.gates.perplexty: "
        "unknown key 'perplexty'; did you mean 'perplexity'?",
    ]


def test_invalid_pipeline_name_points_at_the_key() -> None:
    assert problems_of(MINIMAL.replace("  demo:", "  Demo:")) == [
        "p.yaml:3:3: pipelines.Demo: invalid key: "
        "String should match pattern '^[a-z][a-z0-9_-]{0,62}$' (got 'Demo')",
    ]


# ---------------------------------------------------------------------------- bad values
def test_wrong_type_names_the_value() -> None:
    # Only one problem: pydantic's echo "steps/candidates should have at least 1 item" is dropped.
    assert problems_of(MINIMAL.replace("{bits: 8}", "{bits: eight}")) == [
        "p.yaml:8:32: pipelines.demo.compress.candidates.0.steps.0.quantize.bits: "
        "Input should be 8 or 4 (got 'eight')",
    ]


def test_out_of_range_value() -> None:
    text = MINIMAL + "    canary:\n      thresholds:\n        min_success_rate: 1.5\n"
    assert problems_of(text) == [
        "p.yaml:13:27: pipelines.demo.canary.thresholds.min_success_rate: "
        "Input should be less than or equal to 1 (got 1.5)",
    ]


def test_invalid_literal_lists_the_allowed_values() -> None:
    assert problems_of(MINIMAL + "    model: {dtype: fp16}\n") == [
        "p.yaml:11:20: pipelines.demo.model.dtype: "
        "Input should be 'float32', 'bfloat16' or 'float16' (got 'fp16')",
    ]


def test_empty_value_where_a_mapping_is_expected_points_at_the_key() -> None:
    assert problems_of(MINIMAL + "    canary:\n") == [
        "p.yaml:11:5: pipelines.demo.canary: Input should be a mapping (got null)",
    ]


def test_list_where_a_mapping_is_expected() -> None:
    assert problems_of(MINIMAL + "    canary: [5, 100]\n") == [
        "p.yaml:11:13: pipelines.demo.canary: Input should be a mapping (got a list)",
    ]


def test_empty_list_is_too_short() -> None:
    assert problems_of(MINIMAL.replace("steps:\n", "steps: []\n").replace("- quantize: {bits: 8}", "")) == [
        "p.yaml:7:18: pipelines.demo.compress.candidates.0.steps: List should have at least 1 item (got 0)",
    ]


def test_missing_required_field_points_at_the_mapping() -> None:
    text = MINIMAL.replace("    tracking:\n      registered_model: demo-llm\n", "")
    assert problems_of(text) == [
        "p.yaml:4:5: pipelines.demo.tracking: missing required field 'tracking'",
    ]


# ------------------------------------------------------------------------- model validators
def test_canary_steps_must_ascend() -> None:
    assert problems_of(MINIMAL + "    canary:\n      steps: [5, 50, 25, 100]\n") == [
        "p.yaml:12:14: pipelines.demo.canary.steps: "
        "steps must be strictly ascending, e.g. [5, 10, 25, 50, 100]",
    ]


def test_candidate_names_must_be_unique() -> None:
    text = MINIMAL.replace(
        "          steps:\n            - quantize: {bits: 8}\n",
        "          steps: [{quantize: {}}]\n        - name: int8\n          steps: [{quantize: {}}]\n",
    )
    assert problems_of(text) == [
        "p.yaml:6:9: pipelines.demo.compress.candidates: candidate names must be unique; repeated: int8",
    ]


def test_step_without_a_kind_points_at_the_step_mapping() -> None:
    assert problems_of(MINIMAL.replace("- quantize: {bits: 8}", "- quantize:")) == [
        "p.yaml:8:15: pipelines.demo.compress.candidates.0.steps.0: "
        "a step has exactly one kind (quantize, sensitivity, qat, distill, prune, recover); got 0",
    ]


# --------------------------------------------------------------------------------- YAML errors
def test_unclosed_bracket_reports_the_yaml_position() -> None:
    text = """\
    version: 1
    pipelines:
      demo:
        canary:
          steps: [5, 10, 100
        tracking: {registered_model: demo-llm}
    """
    assert problems_of(text) == [
        "p.yaml:6:13: yaml: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence at line 5, column 14)",
    ]


def test_bad_indentation_reports_the_yaml_position() -> None:
    text = """\
    version: 1
    pipelines:
      demo:
        compress:
       tracking: {registered_model: demo-llm}
    """
    assert problems_of(text) == [
        "p.yaml:5:4: yaml: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping at line 3, column 3)",
    ]


def test_duplicate_keys_are_reported_at_the_second_key() -> None:
    text = MINIMAL + "    tracking:\n      registered_model: other\n"
    assert problems_of(text) == [
        "p.yaml:11:5: pipelines.demo.tracking: duplicate key 'tracking'",
    ]


def test_empty_file() -> None:
    assert problems_of("# nothing here\n") == [
        "p.yaml:1:1: file: empty; expected a mapping with 'version' and 'pipelines'",
    ]


def test_top_level_must_be_a_mapping() -> None:
    assert problems_of("- demo\n") == ["p.yaml:1:1: <root>: the top level must be a mapping (got a list)"]


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems == [f"{path}:1:1: file: not found"]


def test_file_name_is_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text("version: 2\n" + MINIMAL.removeprefix("version: 1\n"), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems == [f"{path}:1:10: version: Input should be 1 (got 2)"]
    assert str(info.value) == info.value.problems[0]


# ------------------------------------------------------------------------------- all at once
def test_every_problem_is_reported_at_once_and_sorted() -> None:
    text = """\
    version: 1
    pipelines:
      demo:
        monitor: {schedule: hourly}
        canary:
          steps: [50, 10, 100]
          promote: true
          promote: false
        compress:
          candidates:
            - name: int8
              steps:
                - quantize: {bits: 3, granularity: per_row}
        model: {dtpye: float16}
    """
    assert problems_of(text) == [
        "p.yaml:4:5: pipelines.demo.tracking: missing required field 'tracking'",
        "p.yaml:4:25: pipelines.demo.monitor.schedule: "
        "schedule must be a 5-field cron expression, e.g. '0 * * * *' (got 'hourly')",
        "p.yaml:6:14: pipelines.demo.canary.steps: "
        "steps must be strictly ascending, e.g. [5, 10, 25, 50, 100]",
        "p.yaml:8:7: pipelines.demo.canary.promote: duplicate key 'promote'",
        "p.yaml:13:32: pipelines.demo.compress.candidates.0.steps.0.quantize.bits: "
        "Input should be 8 or 4 (got 3)",
        "p.yaml:13:48: pipelines.demo.compress.candidates.0.steps.0.quantize.granularity: "
        "Input should be 'per_tensor', 'per_channel' or 'group' (got 'per_row')",
        "p.yaml:14:13: pipelines.demo.model.dtpye: unknown key 'dtpye'; did you mean 'dtype'?",
    ]


# ------------------------------------------------------------------------- schema and repo file
def test_committed_json_schema_is_current() -> None:
    committed = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == json.loads(json_schema_text()), (
        f"{SCHEMA_PATH} is stale: run `lockgate schema > schemas/pipelines.schema.json`"
    )


def test_json_schema_is_deterministic_and_id_free(tmp_path: Path) -> None:
    schema = json_schema()
    assert "$id" not in schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    written = tmp_path / "schema.json"
    write_json_schema(written)
    assert written.read_text(encoding="utf-8") == json_schema_text()
    assert json_schema_text().endswith("}\n")


def test_json_schema_accepts_the_minimal_spec_and_rejects_a_typo() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.check_schema(json_schema())
    assert not list(validator.iter_errors(yaml.safe_load(MINIMAL)))
    assert list(validator.iter_errors(yaml.safe_load(MINIMAL + "    cannary: {}\n")))


def test_repository_pipelines_yaml_validates() -> None:
    path = REPO_ROOT / "pipelines.yaml"
    if not path.exists():
        pytest.skip("pipelines.yaml is not in the repository yet")
    assert isinstance(load_spec(path), PipelinesFile)


# ------------------------------------------------------------------------- canary strategies
def test_canary_steps_take_shorthand_and_objects_and_the_exponential_plan() -> None:
    text = MINIMAL + (
        "    canary:\n"
        "      steps: [2, 4, 8, 16, 32, 64, {share: 100, min_requests: 50, duration_s: 300}]\n"
        "      min_canary_requests: 30\n"
    )
    canary = load_spec_text(text, FILE).pipelines["demo"].canary
    assert canary.shares == (2, 4, 8, 16, 32, 64, 100)  # exercise 9.3: 2 -> 4 -> ... -> 100
    assert [canary.min_requests(s) for s in canary.steps] == [30] * 6 + [50]
    assert canary.steps[-1].duration_s == 300
    assert canary.strategy == "canary" and canary.analysis.alpha == 0.05


def test_bad_step_durations_are_errors_never_defaults() -> None:
    text = (
        MINIMAL + "    canary:\n      steps: [5, {share: 50, duration_s: 0}, {share: 100, duration_s: 5m}]\n"
    )
    assert problems_of(text) == [
        "p.yaml:12:42: pipelines.demo.canary.steps.1.duration_s: Input should be greater than 0 (got 0)",
        "p.yaml:12:71: pipelines.demo.canary.steps.2.duration_s: "
        "Input should be a valid number, unable to parse string as a number (got '5m')",
    ]


def test_step_typos_and_non_steps_point_at_the_step() -> None:
    assert problems_of(MINIMAL + "    canary:\n      steps: [5, {share: 50, min_request: 10}, 100]\n") == [
        "p.yaml:12:30: pipelines.demo.canary.steps.1.min_request: "
        "unknown key 'min_request'; did you mean 'min_requests'?"
    ]
    assert problems_of(MINIMAL + "    canary:\n      steps: [5, fifty, 100]\n") == [
        "p.yaml:12:18: pipelines.demo.canary.steps.1: "
        "a step is a traffic share (e.g. 25) or a mapping {share, min_requests, duration_s} (got 'fifty')"
    ]


def test_strategy_parameters_must_match_the_strategy() -> None:
    assert problems_of(MINIMAL + "    canary:\n      strategy: canary\n      shadow: {requests: 50}\n") == [
        "p.yaml:12:7: pipelines.demo.canary: "
        "shadow parameters are set but strategy is 'canary': set strategy: shadow or remove them"
    ]
    text = (
        MINIMAL
        + "    canary:\n      strategy: blue_green\n      blue_green: {bake_s: 5, bake_requests: 20}\n"
    )
    canary = load_spec_text(text, FILE).pipelines["demo"].canary
    assert (canary.blue_green.bake_s, canary.blue_green.bake_requests) == (5, 20)
    assert problems_of(MINIMAL + "    canary: {strategy: blue_green, promote: false}\n") == [
        "p.yaml:11:13: pipelines.demo.canary: "
        "blue_green switches Production before its checks: promote: false cannot apply"
    ]


def test_a_step_that_could_never_be_judged_is_refused() -> None:
    assert problems_of(MINIMAL + "    canary:\n      steps: [{share: 5, min_requests: 900}, 100]\n") == [
        "p.yaml:12:7: pipelines.demo.canary: "
        "step 5% needs 900 canary requests > max_requests_per_step (400): it could never be judged"
    ]


# ------------------------------------------------------------------- datasets a step needs
OWN_MODEL = """\
version: 1
pipelines:
  own:
    model: {source: HuggingFaceTB/SmolLM2-135M-Instruct}
    data:
      eval: {source: eval.jsonl}
    compress:
      candidates:
        - name: pruned
          steps:
            - prune: {structure: mlp_neurons, importance: taylor}
            - recover: {steps: 10}
        - name: student
          steps:
            - distill: {layers_ratio: 0.5}
    tracking:
      registered_model: own-llm
"""


def test_a_dataset_a_step_trains_on_must_be_given_for_a_real_model() -> None:
    assert problems_of(OWN_MODEL) == [
        "p.yaml:11:15: pipelines.own.data.calibration: step 1 (prune) of candidate 'pruned' uses "
        "data.calibration, which the spec does not give; the built-in demo rows apply only to "
        "model.source: demo - add data.calibration: {source: <file .jsonl/.csv/.parquet>}",
        "p.yaml:12:15: pipelines.own.data.train: step 2 (recover) of candidate 'pruned' uses data.train, "
        "which the spec does not give; the built-in demo rows apply only to model.source: demo - add "
        "data.train: {source: <file .jsonl/.csv/.parquet>}",
        "p.yaml:15:15: pipelines.own.data.train: step 1 (distill) of candidate 'student' uses data.train, "
        "which the spec does not give; the built-in demo rows apply only to model.source: demo - add "
        "data.train: {source: <file .jsonl/.csv/.parquet>}",
        "p.yaml:15:15: pipelines.own.data.calibration: step 1 (distill) of candidate 'student' uses "
        "data.calibration, which the spec does not give; the built-in demo rows apply only to "
        "model.source: demo - add data.calibration: {source: <file .jsonl/.csv/.parquet>}",
    ]


def test_given_datasets_or_the_demo_model_need_no_more() -> None:
    given = OWN_MODEL.replace(
        "      eval: {source: eval.jsonl}\n",
        "      eval: {source: eval.jsonl}\n      train: {source: train.jsonl}\n"
        "      calibration: {source: demo}\n",  # an explicit choice, kept
    )
    assert load_spec_text(given, FILE).pipelines["own"].data.train.source == "train.jsonl"
    sized_only = given.replace("train: {source: train.jsonl}", "train: {max_samples: 50}")
    assert [p.split(": ")[1] for p in problems_of(sized_only)] == ["pipelines.own.data.train"] * 2
    demo = OWN_MODEL.replace("    model: {source: HuggingFaceTB/SmolLM2-135M-Instruct}\n", "")
    assert load_spec_text(demo, FILE).pipelines["own"].data.train.source == "demo"


def test_steps_that_need_no_dataset_need_none_given() -> None:
    plain = MINIMAL.replace("  demo:\n", "  demo:\n    model: {source: ./my-model}\n")
    assert load_spec_text(plain, FILE).pipelines["demo"].model.source == "./my-model"
    static = plain.replace("{bits: 8}", "{bits: 8, mode: static}")
    assert problems_of(static)[0].startswith(
        "p.yaml:9:15: pipelines.demo.data.calibration: step 1 (quantize)"
    )


def test_quantizing_steps_share_one_grid_definition() -> None:
    from lockgate.flows.spec import QatStep, QuantGrid, QuantizeStep, SensitivityStep

    grid = set(QuantGrid.model_fields)
    assert grid == {"bits", "granularity", "group_size"}
    for step in (QuantizeStep, SensitivityStep, QatStep):
        assert issubclass(step, QuantGrid) and grid <= set(step.model_fields)
    # sensitivity probes the following quantize step's grid unless told otherwise (None)
    assert (QuantizeStep().bits, SensitivityStep().bits, QatStep().bits) == (8, None, 4)
    for step in (QuantizeStep, QatStep):  # their results pack 4-bit codes two per byte
        with pytest.raises(ValueError, match="group_size: 4-bit codes are packed two per byte, 33 is odd"):
            step(bits=4, granularity="group", group_size=33)


def test_monitor_latency_bound_is_not_the_batch_wait() -> None:
    from lockgate.flows.spec import MonitorSpec

    assert MonitorSpec(max_plausible_latency_ms=1000).max_plausible_latency_ms == 1000
    with pytest.raises(ValueError, match="max_latency_ms was renamed max_plausible_latency_ms"):
        MonitorSpec.model_validate({"max_latency_ms": 1000})
