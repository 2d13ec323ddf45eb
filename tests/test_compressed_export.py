"""lockgate quantized folders exported as compressed-tensors checkpoints (bentos/compressed_export.py).

Loaded back by transformers' own compressed-tensors integration (a real library reading the files, not
our reader): every quantized weight dequantizes to exactly lockgate's, the config names the right
schemes and leaves float Linears out. vLLM serving the export: tests/vllm_engine/test_vllm_quantized.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import quantize_folder, run_cli
from lockgate.bentos.compressed_export import ExportError, export, export_cached, unsupported_reason
from lockgate.bentos.quantized import QuantLinear, QuantScheme, load_quantized

SCHEMES = {
    "int4-sym-g32": QuantScheme(bits=4, granularity="group", group_size=32),
    "int4-asym-g32": QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32),
    "int8-dynamic-per-token": QuantScheme(mode="dynamic"),
    "int8-weight-only-asym-channel": QuantScheme(symmetric=False),
}


def _dequantized_by_transformers(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("variant", sorted(SCHEMES))
def test_export_dequantizes_to_exactly_lockgates_weights(
    tiny_llm_dir: Path, tmp_path: Path, variant: str
) -> None:
    scheme = SCHEMES[variant]
    ours = quantize_folder(tiny_llm_dir, tmp_path / "lockgate", scheme)
    exported = export(ours, tmp_path / "ct")
    qconfig = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["quantization_status"] == "compressed"
    expected_format = "int-quantized" if scheme.mode == "dynamic" else "pack-quantized"
    assert qconfig["format"] == expected_format
    (group,) = qconfig["config_groups"].values()
    assert group["weights"]["num_bits"] == scheme.bits and group["weights"]["symmetric"] == scheme.symmetric
    if scheme.mode == "dynamic":
        assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    assert "lm_head" in qconfig["ignore"] and "lm_head" not in group["targets"]
    assert (exported / "tokenizer.json").is_file() and not (exported / "lockgate_quant.json").exists()
    # Weight-only kernels (vLLM CPU WNA16, Marlin) take half-precision activations only.
    dtype = json.loads((exported / "config.json").read_text())["dtype"]
    assert dtype == ("float32" if scheme.mode == "dynamic" else "bfloat16")

    reference = {n: m for n, m in load_quantized(ours).named_modules() if isinstance(m, QuantLinear)}
    loaded = _dequantized_by_transformers(exported)
    assert set(reference) <= set(loaded) and len(reference) == 14
    for name, layer in reference.items():
        assert torch.equal(loaded[name], layer.dequantized_weight()), name


def test_static_activations_are_refused_naming_the_layer(tiny_llm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lockgate.bentos.quantized import quantize_linears, save_quantized

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype="float32")
    name = "model.layers.0.mlp.down_proj"
    quantize_linears(model, [name], QuantScheme(mode="static"), {name: (-1.0, 2.0)})
    save_quantized(model, tmp_path / "static")
    assert unsupported_reason(tmp_path / "static") is not None and name in unsupported_reason(
        tmp_path / "static"
    )
    with pytest.raises(ExportError, match=f"{name}: mode static"):
        export(tmp_path / "static", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_float_zero_points_are_refused_naming_the_layer(tiny_llm_dir: Path, tmp_path: Path) -> None:
    scheme = QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32, float_zero=True)
    ours = quantize_folder(tiny_llm_dir, tmp_path / "float-zero", scheme)
    reason = unsupported_reason(ours)
    assert reason is not None and "zero_point float" in reason and "model.layers." in reason
    with pytest.raises(ExportError, match=r"model\.layers\.\d+\.\w+\.\w+_proj: zero_point float"):
        export(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cached_reuses_one_export_per_folder_content(tiny_llm_dir: Path, tmp_path: Path) -> None:
    ours = quantize_folder(tiny_llm_dir, tmp_path / "lockgate", SCHEMES["int4-sym-g32"])
    first = export_cached(ours, tmp_path / "cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert export_cached(ours, tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not written again


def test_cli_exports_and_refuses_a_plain_folder(tiny_llm_dir: Path, tmp_path: Path) -> None:
    ours = quantize_folder(tiny_llm_dir, tmp_path / "lockgate", SCHEMES["int8-dynamic-per-token"])
    done = run_cli("export", "compressed-tensors", str(ours), str(tmp_path / "ct"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "ct") and (tmp_path / "ct" / "model.safetensors").is_file()
    refused = run_cli("export", "compressed-tensors", str(tiny_llm_dir), str(tmp_path / "x"))
    assert refused.returncode == 2 and "not a lockgate quantized folder" in refused.stderr, refused.stderr
