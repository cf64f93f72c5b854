"""LoRA and QLoRA layers for the MLX model; which modules get which rank is core/adapters.py's.

Notable:
- `LoRALinear` wraps a plain `nn.Linear` or a quantized `nn.QuantizedLinear` (QLoRA) and always takes the
  real shape of the projection: under GQA `k_proj`/`v_proj` map hidden -> n_kv_heads * head_dim.
- The adapter file stores `lora_a` (in, r) and `lora_b` (r, out), mlx-lm's orientation; it is read and
  written through core/adapters.py, so a run directory of either backend loads here.
- This module is the LoRA API on MLX: the layers and their application here, with the plans of
  core/adapters.py (`plan_modules`, `adapter_config`, `count_params`, ...) importable from it too.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...core import adapters as core_adapters
from ...core.adapters import (ModuleSpec, adapter_config, count_params, fingerprint,  # noqa: F401
                              lora_scale, plan_modules, wrap_modules)
from .model import QuantizedSwitchLinear, SwitchLinear


# ---- the layer ---------------------------------------------------------------------------------------
def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of an `nn.Linear` or `nn.QuantizedLinear`."""
    if isinstance(module, nn.QuantizedLinear):
        out, packed = module.weight.shape
        return packed * 32 // module.bits, out
    if isinstance(module, nn.Linear):
        out, n_in = module.weight.shape
        return n_in, out
    raise ValueError(f"LoRA needs an nn.Linear or nn.QuantizedLinear, got {type(module).__name__}")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) @ lora_a @ lora_b, with fp32 `lora_a` (in, r), `lora_b` (r, out)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, key=None):
        super().__init__()
        self.rank, self.alpha, self.scale = lora_scale(rank, alpha)
        n_in, n_out = linear_shape(base)
        self.base = base
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(n_in)  # A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0: the adapter starts as a no-op
        self.lora_a = mx.random.uniform(-bound, bound, (n_in, rank), dtype=mx.float32, key=key)
        self.lora_b = mx.zeros((rank, n_out), dtype=mx.float32)
        self.enabled = True  # False: the base layer alone (DPO's reference pass; read at trace time)

    def __call__(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        z = (self.dropout(x).astype(mx.float32) @ self.lora_a) @ self.lora_b  # (..., out) in fp32
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """The weight update scale * (lora_a @ lora_b).T, shaped like the base weight (out, in), fp32."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def fused(self, dequantize: bool = False) -> nn.Module:
        """A plain layer computing base + adapter (re-quantized when the base is quantized, unless asked)."""
        b = self.base
        if isinstance(b, nn.QuantizedLinear):
            w = mx.dequantize(b.weight, b.scales, b.biases, b.group_size, b.bits)  # (out, in)
            w = (w.astype(mx.float32) + self.delta()).astype(b.scales.dtype)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = w
            return lin if dequantize else nn.QuantizedLinear.from_linear(lin, b.group_size, b.bits)
        lin = nn.Linear(b.weight.shape[1], b.weight.shape[0], bias=False)
        lin.weight = (b.weight.astype(mx.float32) + self.delta()).astype(b.weight.dtype)
        return lin


# ---- applying, saving, loading --------------------------------------------------------------------------
def _get(model: nn.Module, name: str) -> nn.Module:
    m = model
    for part in name.split(".") if name else []:
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m


def _set(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, leaf = name.rpartition(".")
    parent = _get(model, parent_name)
    setattr(parent, leaf, module)


def apply_specs(model: nn.Module, specs: dict[str, ModuleSpec], dropout: float = 0.0, seed: int = 0):
    """Freeze `model` and wrap each named module in a `LoRALinear`; checks every shape against the model."""
    model.freeze()
    keys = mx.random.split(mx.random.key(seed), max(2, len(specs)))  # one key per module: reproducible

    def wrap(i, name, base, spec):
        _set(model, name, LoRALinear(base, spec.rank, spec.alpha, dropout, key=keys[i]))

    wrap_modules(specs, lambda name: _get(model, name), linear_shape, LoRALinear, wrap)


def apply_lora(model, targets="all-linear", *, dropout: float = 0.0, seed: int = 0, **plan) -> dict[str, ModuleSpec]:
    """Freeze `model`, add LoRA adapters by the plan `plan_modules(model.args, targets, **plan)`, return it."""
    specs = plan_modules(model.args, targets, **plan)
    apply_specs(model, specs, dropout, seed)
    return specs


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """`{module.lora_a|lora_b: array}` of every adapter in `model`."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_adapters_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every adapter of `model` on or off in place (no weights copied); returns how many. Off, the
    model computes exactly its base model (DPO's reference). Under `mx.compile` the switch is read while
    tracing: a function traced with the adapters off stays so."""
    mods = lora_modules(model)
    for m in mods.values():
        m.enabled = enabled
    return len(mods)


def save_adapters(run_dir: str | Path, model: nn.Module, config: dict | None = None):
    """Write `adapters.safetensors` (and `adapter_config.json` when given) into `run_dir`, atomically."""
    core_adapters.save_adapters(run_dir, {k: np.array(v) for k, v in adapter_weights(model).items()}, config)


def load_adapters(model: nn.Module, run_dir: str | Path, dropout: float | None = None) -> dict:
    """Add the adapters of a run directory (either backend's) to `model` (frozen), refusing any shape
    mismatch; returns the adapter config. Raises ValueError naming the module, the expected and the found
    shapes."""
    cfg, specs, weights = core_adapters.read_adapters(run_dir, mx.load)
    apply_specs(model, specs, cfg.get("dropout", 0.0) if dropout is None else dropout)
    model.load_weights(list(weights.items()), strict=False)
    return cfg


def fuse(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every adapter into its base weight, leaving plain (or re-quantized) linears; returns `model`."""
    for name, m in lora_modules(model).items():
        _set(model, name, m.fused(dequantize))
    if dequantize:
        for name, m in list(model.named_modules()):
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
                w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(m.scales.dtype)
                if isinstance(m, nn.QuantizedEmbedding):
                    plain = nn.Embedding(w.shape[0], w.shape[1])
                elif isinstance(m, nn.QuantizedLinear):
                    plain = nn.Linear(w.shape[1], w.shape[0], bias=False)
                else:
                    plain = SwitchLinear(w.shape[2], w.shape[1], w.shape[0])
                plain.weight = w
                _set(model, name, plain)
    return model
