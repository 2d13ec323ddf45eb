"""GPTQ (Frantar et al., 2022): weight-only quantization that compensates each column's rounding error.

For a Linear with calibration inputs X, the layer's output error ``‖X Wᵀ − X Qᵀ‖²`` is a quadratic
form in the weight error with Hessian ``H = 2 XᵀX / n``. GPTQ quantizes the input columns one at a
time (to lockgate's grid: same bits, symmetry and groups as round-to-nearest) and spreads each
column's error over the columns not yet quantized through the inverse Hessian's Cholesky factor,
in blocks of ``block_size`` columns with a lazy update of the rest (the paper's algorithm 1).
A group's scale is chosen when its first column is reached, from the already-updated weights.
Inside a block the loop over columns is a handful of vector operations on contiguous rows of Wᵀ and
one rank-1 matmul; everything else is matrix algebra (≈0.05-0.5 s per SmolLM2 Linear on 2 cores).

Hessians are collected in one pass of the float model over the calibration prompts (every layer
sees float inputs; the paper's sequential variant feeds quantized outputs forward instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lockgate.tasks.compression.layer_inputs import visit_layer_inputs

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lockgate.bentos.quantized import QuantLinear, QuantScheme

#: Added to H's diagonal as a share of its mean: keeps the Cholesky factorisation defined.
DAMPING = 0.01


def hessians(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: list[str], prompts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """``2 XᵀX / n`` of each named Linear's inputs over ``prompts`` (one prompt at a time)."""

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        gram = x.T @ x
        sums[name] = gram if name not in sums else sums[name] + gram
        counts[name] += x.shape[0]

    visit_layer_inputs(model, tokenizer, names, prompts, accumulate)
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"calibration prompts never reached {missing[:3]}")
    return {n: (2.0 * sums[n] / counts[n]).float() for n in names}


def _group_grid(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [rows], zero [rows] or None) of round-to-nearest on the columns ``w`` [rows, cols]."""
    from lockgate.bentos.quantized import quantize_weight

    one_group = type(scheme)(
        bits=scheme.bits, symmetric=scheme.symmetric, granularity="per_channel", float_zero=scheme.float_zero
    )
    _, scale, zero = quantize_weight(w, one_group)
    return scale[:, 0], None if zero is None else zero[:, 0].float()


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes int8 [out, in], scale [out, groups], zero int8 [out, groups] or None) as
    ``bentos.quantized.quantize_weight`` returns them, with GPTQ's error compensation."""
    import torch

    from lockgate.bentos.quantized import zero_dtype

    if scheme.granularity == "per_tensor":
        raise ValueError("method: gptq needs granularity per_channel or group")
    rows, cols = weight.shape
    group = scheme.group_size if scheme.granularity == "group" else cols
    if scheme.granularity == "group":
        scheme.groups(cols)  # raises if the group size does not divide the layer
        block_size = max(group, block_size - block_size % group)
    # Work on Wᵀ: each input column of W is then one contiguous row, so the per-column steps below
    # (round, error, rank-1 update) run on contiguous vectors; that loop is GPTQ's only Python loop.
    w = weight.detach().float().T.contiguous()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(cols)
    # Upper Cholesky factor of H⁻¹: row i holds the update that column i's error spreads to the right.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(cols, rows)
    groups = cols // group
    scales = torch.empty(groups, rows)
    zeros = None if scheme.symmetric else torch.empty(groups, rows)
    qmin, qmax = float(scheme.qmin), float(scheme.qmax)
    scale = torch.ones(rows)
    zero = torch.zeros(rows)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[start:end]  # a view: the updates below land in w
        errors = torch.empty(end - start, rows)
        h_block = h_inv[start:end, start:end]
        pivots = h_block.diagonal().tolist()
        for i in range(end - start):
            column = start + i
            if column % group == 0:
                # Scale from the updated weights of the group (inside this block: block % group == 0).
                scale, zero = _group_grid(w[column : column + group].T, scheme)
                scales[column // group] = scale
                if zeros is not None:
                    zeros[column // group] = zero
            x = block[i]
            if scheme.float_zero:
                q = torch.round(x / scale + zero)  # a float offset: round after adding it
            else:
                q = torch.round(x / scale)
                if zeros is not None:
                    q += zero
            q.clamp_(qmin, qmax)
            codes[column] = q
            if zeros is not None:
                q -= zero
            err = errors[i]
            torch.sub(x, q.mul_(scale), out=err)
            err.div_(pivots[i])
            if i + 1 < end - start:
                # A rank-1 update as a k=1 matmul: torch's addr_ took 50x longer here on CPU.
                block[i + 1 :].addmm_(h_block[i, i + 1 :, None], err[None, :], alpha=-1.0)
        if end < cols:
            w[end:].addmm_(h_inv[start:end, end:].T, errors, alpha=-1.0)
    codes_out = codes.T.contiguous().to(torch.int8)
    zero_out = None if zeros is None else zeros.T.contiguous().to(zero_dtype(scheme))
    return codes_out, scales.T.contiguous(), zero_out


def gptq_linear(linear: torch.nn.Linear, hessian: torch.Tensor, scheme: QuantScheme) -> QuantLinear:
    """A QuantLinear holding GPTQ's codes for ``linear`` (lockgate's format, same forward)."""
    from lockgate.bentos.quantized import QuantLinear, pack_int4

    if scheme.mode != "weight_only":
        raise ValueError("method: gptq is weight-only; set mode: weight_only")
    module = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme)
    q, scale, zero = gptq_quantize(linear.weight, hessian, scheme)
    module.qweight = pack_int4(q) if scheme.bits == 4 else q
    module.scale = scale.contiguous()
    module.zero_point = zero
    if linear.bias is not None:
        module.bias = linear.bias.detach().float().clone()
    return module.prepare()
