"""LoRA and QLoRA layers for the torch model, with the semantics and the files of the MLX backend's.

Notable:
- Which modules get which rank and alpha is decided by `core.adapters.plan_modules` (the pure rank
  policies), and the files are read and written through core/adapters.py, so a config means the same
  adapters on both backends and a run directory of either loads in the other.
- `LoRALinear` computes y = base(x) + (alpha / r) * dropout(x) @ lora_a @ lora_b with fp32 `lora_a` (in, r)
  and `lora_b` (r, out): the orientation and names of the MLX adapters, so `adapters.safetensors` and
  `adapter_config.json` written by one backend load in the other.
- QLoRA on torch quantizes the base's projections to 4-bit NF4 with bitsandbytes (CUDA only). It is not
  MLX's affine 4-bit: a QLoRA run on one backend does not reproduce the other's numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ...core import adapters as core_adapters
from ...core.adapters import ModuleSpec, lora_scale, plan_modules, wrap_modules


# ---- the layer ---------------------------------------------------------------------------------------
def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of an `nn.Linear` or a bitsandbytes `Linear4bit`."""
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    raise ValueError(f"LoRA needs an nn.Linear, got {type(module).__name__}")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) @ lora_a @ lora_b, with fp32 `lora_a` (in, r), `lora_b` (r, out)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.rank, self.alpha, self.scale = lora_scale(rank, alpha)
        n_in, n_out = linear_shape(base)
        self.base = base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        bound = 1 / math.sqrt(n_in)  # A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0: the adapter starts as a no-op
        a = torch.rand(n_in, rank, generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.lora_a = nn.Parameter(a.to(device))
        self.lora_b = nn.Parameter(torch.zeros(rank, n_out, dtype=torch.float32, device=device))
        self.enabled = True  # False: the base layer alone (DPO's reference pass)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        z = (self.dropout(x).float() @ self.lora_a) * self.scale  # (..., r): scaling r columns, not `out`
        return y + (z @ self.lora_b).to(y.dtype)  # fp32 (bf16 under autocast)

    def delta(self) -> torch.Tensor:
        """The weight update scale * (lora_a @ lora_b).T, shaped like the base weight (out, in), fp32."""
        return self.scale * (self.lora_a.float() @ self.lora_b.float()).T

    def fused(self) -> nn.Linear:
        """A plain `nn.Linear` computing base + adapter (a 4-bit base is dequantized)."""
        w = base_weight(self.base)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_((w.float() + self.delta()).to(w.dtype))
        return lin


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def base_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a plain or bitsandbytes 4-bit linear, dequantized."""
    w = module.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    return w.data


# ---- applying, saving, loading --------------------------------------------------------------------------
def _set(model: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def apply_specs(model: nn.Module, specs: dict[str, ModuleSpec], dropout: float = 0.0, seed: int = 0):
    """Freeze `model` and wrap each named module in a `LoRALinear`; checks every shape against the model."""
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)

    def wrap(i, name, base, spec):
        _set(model, name, LoRALinear(base, spec.rank, spec.alpha, dropout, gen))

    wrap_modules(specs, model.get_submodule, linear_shape, LoRALinear, wrap)


def apply_lora(model, targets="all-linear", *, dropout: float = 0.0, seed: int = 0, **plan) -> dict[str, ModuleSpec]:
    """Freeze `model`, add LoRA adapters by the plan `plan_modules(model.args, targets, **plan)`, return it."""
    specs = plan_modules(model.args, targets, **plan)
    apply_specs(model, specs, dropout, seed)
    return specs


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_adapters_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every adapter of `model` on or off in place (no weights copied); returns how many. Off, the
    model computes exactly its base model (DPO's reference)."""
    mods = lora_modules(model)
    for m in mods.values():
        m.enabled = enabled
    return len(mods)


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{module.lora_a|lora_b: tensor}` of every adapter in `model`."""
    return {k: v for k, v in model.named_parameters() if k.endswith((".lora_a", ".lora_b"))}


def save_adapters(run_dir: str | Path, model: nn.Module, config: dict | None = None):
    """Write `adapters.safetensors` (and `adapter_config.json` when given) into `run_dir`, atomically; the
    same files as the MLX backend's `save_adapters`."""
    arrays = {k: v.detach().float().cpu().numpy() for k, v in adapter_weights(model).items()}
    core_adapters.save_adapters(run_dir, arrays, config)


def load_adapters(model: nn.Module, run_dir: str | Path, dropout: float | None = None) -> dict:
    """Add the adapters of a run directory (either backend's) to `model` (frozen), refusing any shape
    mismatch; returns the adapter config."""
    from safetensors.torch import load_file

    cfg, specs, weights = core_adapters.read_adapters(run_dir, load_file)
    apply_specs(model, specs, cfg.get("dropout", 0.0) if dropout is None else dropout)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.float())
    return cfg


def fuse(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving plain `nn.Linear`s; returns `model`."""
    for name, m in lora_modules(model).items():
        _set(model, name, m.fused())
    return model


# ---- QLoRA ----------------------------------------------------------------------------------------------
def quantize_4bit(model: nn.Module, compute_dtype=torch.bfloat16) -> nn.Module:
    """Replace the attention and MLP projections with bitsandbytes NF4 `Linear4bit` (CUDA only).

    Embeddings, norms, the LM head, the router and Mixtral's stacked experts stay as they are.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("QLoRA (quantize: 4) on the torch backend needs bitsandbytes: pip install "
                         "bitsandbytes (CUDA only), or train LoRA on the unquantized model") from None
    if not torch.cuda.is_available():
        raise ValueError("QLoRA (quantize: 4) on the torch backend needs a CUDA GPU (bitsandbytes NF4); on this "
                         "machine use the MLX backend's quantization or plain LoRA")
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in names:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="cpu")
            q.weight = bnb.nn.Params4bit(m.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
            q = q.to("cuda")  # quantizes on the move to the GPU
            _set(model, name, q)
    return model
