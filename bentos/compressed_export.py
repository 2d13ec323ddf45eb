"""lockgate's quantized folders as compressed-tensors checkpoints, the format vLLM and transformers load.

lockgate keeps its own checkpoint format (``bentos/quantized.py``: integer codes, scales, zero points
per Linear). vLLM cannot load that format, so a quantized candidate used to be served by transformers
even where vLLM runs. compressed-tensors (the format of llm-compressor, read by vLLM's
``compressed-tensors`` quantization and by transformers' ``CompressedTensorsHfQuantizer``) stores the
same things under other names; this module writes them there, **without requantizing**: the integer
codes and scales are copied, so the exported model dequantizes to exactly lockgate's weights.

Mapping (one compressed-tensors config group per distinct lockgate scheme, targets = layer names):

* ``weight_only`` (INT4 or INT8 weights, float activations) → format ``pack-quantized``: the codes
  packed eight (4-bit) or four (8-bit) to an int32 by compressed-tensors' own ``pack_to_int32``,
  ``weight_scale``, ``weight_shape`` and, for asymmetric grids, the packed ``weight_zero_point``;
* ``dynamic`` (INT8 weights, INT8 activations quantized at run time) → format ``int-quantized``:
  int8 ``weight`` + ``weight_scale``; activations ``dynamic``, per token (lockgate's ``per_token``) or
  per tensor. compressed-tensors' activation grid is symmetric int8 where lockgate's fbgemm path uses an
  asymmetric uint8 grid, so served activations round slightly differently (weights are identical);
* ``static`` (calibrated activation ranges) is refused: its uint8 grid has no exact int8 equivalent;
* ``zero_point: float`` grids are refused: compressed-tensors' zero points are integer codes.

Linears lockgate left in float (``ignore``, sensitivity's picks) and every other 2-D weight are listed
in the config's ``ignore``. Importing this module needs only the standard library; ``export`` needs
torch, safetensors and compressed-tensors (a vLLM dependency: the serving environment has it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lockgate.bentos.quantized import CONFIG_FILE, WEIGHTS_FILE, is_quantized_folder

#: Written next to the exported weights: which lockgate folder they came from (a cache key).
SOURCE_FILE = "lockgate_source.json"


class ExportError(ValueError):
    """The folder cannot be exported (names the layer or field at fault)."""


def unsupported_reason(folder: Path) -> str | None:
    """Why ``folder`` (a lockgate quantized folder) has no compressed-tensors form, or None."""
    meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    for name, layer in sorted(meta["layers"].items()):
        try:
            _scheme(name, layer)
        except ExportError as exc:
            return str(exc)
    return None


def _weight_args(layer: dict[str, Any]) -> dict[str, Any]:
    strategy = {"per_tensor": "tensor", "per_channel": "channel", "group": "group"}[layer["granularity"]]
    args: dict[str, Any] = {
        "num_bits": layer["bits"],
        "type": "int",
        "symmetric": layer["symmetric"],
        "strategy": strategy,
    }
    if strategy == "group":
        args["group_size"] = layer["group_size"]
    return args


def _scheme(name: str, layer: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(compression format, input activation args) of one lockgate layer."""
    mode = layer["mode"]
    if layer.get("float_zero"):
        raise ExportError(
            f"{name}: zero_point float (a float16 offset per group) has no compressed-tensors form, "
            "whose zero points are integer codes"
        )
    if mode == "weight_only":
        return "pack-quantized", None
    if mode == "dynamic":
        strategy = "token" if layer.get("activations", "per_tensor") == "per_token" else "tensor"
        return "int-quantized", {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": strategy,
            "dynamic": True,
        }
    raise ExportError(f"{name}: mode {mode} (calibrated uint8 activations) has no compressed-tensors form")


def _layer_tensors(name: str, layer: dict[str, Any], fmt: str, tensors: dict[str, Any]) -> dict[str, Any]:
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from lockgate.bentos.quantized import unpack_int4

    codes = tensors[f"{name}.qweight"]
    q = unpack_int4(codes) if layer["bits"] == 4 else codes
    scale = tensors[f"{name}.scale"].float()
    zero = tensors.get(f"{name}.zero_point")
    if layer["granularity"] == "per_tensor":
        scale = scale.reshape(1)
        zero = None if zero is None else zero.reshape(1)
    out: dict[str, Any] = {f"{name}.weight_scale": scale.contiguous()}
    if fmt == "pack-quantized":
        out[f"{name}.weight_packed"] = pack_to_int32(q.to(torch.int8).contiguous(), layer["bits"])
        out[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        if zero is not None:
            # compressed-tensors packs group/channel zero points along the output dimension.
            packed_dim = 0 if layer["granularity"] != "per_tensor" else 1
            zero_2d = zero if zero.dim() == 2 else zero.reshape(1, -1)
            packed_zero = pack_to_int32(zero_2d.to(torch.int8), layer["bits"], packed_dim)
            out[f"{name}.weight_zero_point"] = packed_zero.contiguous()
    else:
        out[f"{name}.weight"] = q.to(torch.int8).contiguous()
        if zero is not None:
            out[f"{name}.weight_zero_point"] = zero.to(torch.int8).contiguous()
    if f"{name}.bias" in tensors:
        out[f"{name}.bias"] = tensors[f"{name}.bias"]
    return out


def quantization_config(meta: dict[str, Any], float_linears: list[str]) -> Any:
    """compressed-tensors' ``QuantizationConfig`` for the layers of ``lockgate_quant.json``."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[str, dict[str, Any]] = {}
    for name, layer in sorted(meta["layers"].items()):
        fmt, inputs = _scheme(name, layer)
        key = json.dumps([fmt, _weight_args(layer), inputs], sort_keys=True)
        group = groups.setdefault(
            key, {"targets": [], "weights": _weight_args(layer), "input_activations": inputs, "format": fmt}
        )
        group["targets"].append(name)
    formats = {g["format"] for g in groups.values()}
    return QuantizationConfig(
        config_groups={f"group_{i}": QuantizationScheme(**group) for i, group in enumerate(groups.values())},
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=float_linears,
    )


def _declare_half_precision(config_file: Path) -> None:
    """Weight-only INT4/INT8 kernels take half-precision activations only (vLLM's CPU WNA16 kernel:
    "cpu_gemm_wna16 not implemented for Float"; Marlin on CUDA: float16/bfloat16): the checkpoint says
    bfloat16, which is also what lockgate's own INT4 CPU kernel computes in."""
    config = json.loads(config_file.read_text())
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        text_config["dtype"] = "bfloat16"
        text_config.pop("torch_dtype", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def export(folder: Path, out: Path) -> Path:
    """Write the compressed-tensors form of lockgate quantized ``folder`` into ``out`` (replaced
    atomically: a crash never leaves half a checkpoint) and return ``out``."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import load_file, save_file

    folder, out = Path(folder), Path(out)
    if not is_quantized_folder(folder):
        raise ExportError(f"{folder}: not a lockgate quantized folder (no {CONFIG_FILE})")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    tensors = load_file(str(folder / WEIGHTS_FILE))
    layers: dict[str, dict[str, Any]] = meta["layers"]
    exported: dict[str, Any] = {}
    for name, layer in layers.items():
        fmt, _ = _scheme(name, layer)
        exported.update(_layer_tensors(name, layer, fmt, tensors))
    owned = {f"{name}.{part}" for name in layers for part in ("qweight", "scale", "zero_point", "bias")}
    for key, tensor in tensors.items():
        if key not in owned and not key.endswith((".input_scale", ".input_zero_point")):
            exported[key] = tensor
    float_linears = sorted(
        key.removesuffix(".weight")
        for key in [*tensors, *meta.get("tied", {})]
        if key.endswith(".weight")
        and key.removesuffix(".weight") not in layers
        and (key not in tensors or tensors[key].dim() == 2)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        for item in folder.iterdir():
            if item.is_file() and item.name not in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(item, staging / item.name)
        save_file(exported, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        config = quantization_config(meta, float_linears)
        ModelCompressor(quantization_config=config).update_config(str(staging))
        if any(_scheme(n, layer)[0] == "pack-quantized" for n, layer in layers.items()):
            _declare_half_precision(staging / "config.json")
        (staging / SOURCE_FILE).write_text(json.dumps({"lockgate_folder": str(folder.resolve())}))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_cached(folder: Path, cache_dir: Path) -> Path:
    """``export`` once per lockgate folder content: the key is the folder's path and its weights file's
    size and modification time (a re-quantized candidate in the same folder gets a new export)."""
    import hashlib

    folder = Path(folder).resolve()
    stat = (folder / WEIGHTS_FILE).stat()
    key = hashlib.sha256(f"{folder}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"{folder.name}-ct-{key}"
    if (out / WEIGHTS_FILE).is_file() and (out / SOURCE_FILE).is_file():
        return out
    return export(folder, out)
