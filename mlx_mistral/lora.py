"""LoRA and QLoRA adapters shaped to each projection, with a GQA-matched rank policy.

Notable:
- `LoRALinear` wraps a plain `nn.Linear` or a quantized `nn.QuantizedLinear` (QLoRA) and always takes the
  real shape of the projection: under GQA `k_proj`/`v_proj` map hidden -> n_kv_heads * head_dim.
- Rank policies are pure functions of `ModelArgs` (`plan_modules`): `uniform` gives every module rank r;
  `gqa` keeps r on q/o (and the MLP) and gives k/v r * n_kv / n_heads, never below a floor, with alpha
  scaled so every module's alpha/r is the user's. PEFT's `rank_pattern`/`alpha_pattern` override both.
- Mixtral: LoRA goes on the attention projections; the router (`block_sparse_moe.gate`) and the stacked
  experts get none (no export path carries expert adapters).
- The adapter file stores `lora_a` (in, r) and `lora_b` (r, out), mlx-lm's orientation; PEFT's lora_A is
  lora_a.T and lora_B is lora_b.T. `adapter_config.json` lists every module with its rank, alpha and shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .io import save_safetensors, write_json
from .model import QuantizedSwitchLinear, SwitchLinear

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION + MLP
POLICIES = ("uniform", "gqa")
ADAPTER_FORMAT = "mlx-mistral-lora"


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
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        n_in, n_out = linear_shape(base)
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(n_in)  # A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0: the adapter starts as a no-op
        self.lora_a = mx.random.uniform(-bound, bound, (n_in, rank), dtype=mx.float32, key=key)
        self.lora_b = mx.zeros((rank, n_out), dtype=mx.float32)

    def __call__(self, x):
        y = self.base(x)
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


# ---- which modules get which rank: pure functions --------------------------------------------------
@dataclass(frozen=True)
class ModuleSpec:
    rank: int
    alpha: float
    n_in: int
    n_out: int

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "in": self.n_in, "out": self.n_out}

    @property
    def params(self) -> int:
        return self.rank * (self.n_in + self.n_out)


def resolve_targets(args: ModelArgs, targets) -> tuple[str, ...]:
    """Target projection names for this model: a list of names, or "all-linear" (Mixtral: attention)."""
    if isinstance(targets, str):
        targets = ["all-linear"] if targets == "all-linear" else targets.replace(",", " ").split()
    targets = list(targets)
    if targets == ["all-linear"]:
        return ATTENTION if args.is_moe else ALL_TARGETS
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or targets}; choose from {' '.join(ALL_TARGETS)} "
                         "or 'all-linear'")
    if args.is_moe and any(t in MLP for t in targets):
        raise ValueError(f"LoRA targets {[t for t in targets if t in MLP]} are Mixtral experts: LoRA on the "
                         "experts is not supported (no export path carries it); use attention targets "
                         f"({' '.join(ATTENTION)}) or 'all-linear'")
    return tuple(t for t in ALL_TARGETS if t in targets)


def module_shape(args: ModelArgs, target: str) -> tuple[int, int]:
    """(in, out) of a projection from the config alone."""
    h, q, kv = args.hidden_size, args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, args.intermediate_size), "up_proj": (h, args.intermediate_size),
            "down_proj": (args.intermediate_size, h)}[target]


def policy_rank(args: ModelArgs, target: str, rank: int, alpha: float, policy: str = "uniform",
                floor: int = 4) -> tuple[int, float]:
    """(rank, alpha) of one projection under a rank policy.

    `gqa`: k/v project to n_kv_heads * head_dim, n_heads / n_kv_heads times narrower than q, so they get
    rank r * n_kv / n_heads (at least `floor`, at most r); alpha follows so alpha / rank is unchanged.
    """
    if policy not in POLICIES:
        raise ValueError(f"rank policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "gqa" and target in ("k_proj", "v_proj"):
        r = min(rank, max(floor, rank * args.num_key_value_heads // args.num_attention_heads))
        return r, alpha * r / rank
    return rank, float(alpha)


def _pattern_value(pattern: dict | None, name: str):
    """PEFT's rule: a key matches a module whose name ends with it as a regex (`(.*\\.)?key$`)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _layer_kind(target: str) -> str:
    return "self_attn" if target in ATTENTION else "mlp"


def plan_modules(args: ModelArgs, targets="all-linear", num_layers: int = -1, rank: int = 16,
                 alpha: float = 32.0, policy: str = "uniform", floor: int = 4, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None) -> dict[str, ModuleSpec]:
    """Every adapted module's name -> ModuleSpec, from the config alone (no model needed).

    `num_layers`: adapt the last N layers (-1: all). Overrides follow PEFT: a `rank_pattern` match sets the
    rank, an `alpha_pattern` match the alpha; an overridden rank without an alpha match keeps `alpha`.
    """
    L = args.num_hidden_layers
    if num_layers == 0 or num_layers < -1 or num_layers > L:
        raise ValueError(f"num_layers must be -1 (all) or 1..{L}, got {num_layers}")
    first = 0 if num_layers == -1 else L - num_layers
    out = {}
    for i in range(first, L):
        for t in resolve_targets(args, targets):
            name = f"model.layers.{i}.{_layer_kind(t)}.{t}"
            r, a = policy_rank(args, t, rank, alpha, policy, floor)
            pr, pa = _pattern_value(rank_pattern, name), _pattern_value(alpha_pattern, name)
            if pr is not None:
                r, a = int(pr), float(alpha)
            if pa is not None:
                a = float(pa)
            if r < 1:
                raise ValueError(f"rank of {name} must be >= 1, got {r} (from rank_pattern)")
            n_in, n_out = module_shape(args, t)
            out[name] = ModuleSpec(r, a, n_in, n_out)
    return out


def count_params(specs: dict[str, ModuleSpec]) -> int:
    """Trainable LoRA parameters of a plan."""
    return sum(s.params for s in specs.values())


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
    for i, (name, spec) in enumerate(specs.items()):
        try:
            base = _get(model, name)
        except (AttributeError, IndexError, KeyError):
            raise ValueError(f"adapter module {name} does not exist in this model") from None
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        found = linear_shape(base)
        if found != (spec.n_in, spec.n_out):
            raise ValueError(f"adapter module {name}: expected (in, out) = ({spec.n_in}, {spec.n_out}) by the "
                             f"adapter, found {found} in the model: the adapter belongs to another model")
        _set(model, name, LoRALinear(base, spec.rank, spec.alpha, dropout, key=keys[i]))


def apply_lora(model, targets="all-linear", num_layers: int = -1, rank: int = 16, alpha: float = 32.0,
               dropout: float = 0.0, policy: str = "uniform", floor: int = 4, rank_pattern: dict | None = None,
               alpha_pattern: dict | None = None, seed: int = 0) -> dict[str, ModuleSpec]:
    """Freeze `model`, add LoRA adapters by the plan of `plan_modules`, and return that plan."""
    specs = plan_modules(model.args, targets, num_layers, rank, alpha, policy, floor, rank_pattern, alpha_pattern)
    apply_specs(model, specs, dropout, seed)
    return specs


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """`{module.lora_a|lora_b: array}` of every adapter in `model`."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def fingerprint(args: ModelArgs) -> str:
    """A short hash of the base model's architecture (shapes, RoPE, window, vocabulary): adapters are only
    valid on a model with the same fingerprint. Quantization and dtype are not part of it."""
    cfg = {k: v for k, v in args.to_hf_config().items() if k != "quantization"}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def adapter_config(specs: dict[str, ModuleSpec], *, base_model: str, args: ModelArgs, targets, num_layers: int,
                   policy: str, rank: int, alpha: float, dropout: float) -> dict:
    """The `adapter_config.json` dict (format `mlx-mistral-lora` version 1)."""
    return {"format": ADAPTER_FORMAT, "version": 1, "base_model": str(base_model),
            "base_fingerprint": fingerprint(args), "fine_tune": "lora",
            "targets": list(resolve_targets(args, targets)), "num_layers": int(num_layers),
            "rank_policy": policy, "rank": int(rank), "alpha": float(alpha), "dropout": float(dropout),
            "modules": {name: s.to_json() for name, s in specs.items()}}


def save_adapters(run_dir: str | Path, model: nn.Module, config: dict | None = None):
    """Write `adapters.safetensors` (and `adapter_config.json` when given) into `run_dir`, atomically."""
    run_dir = Path(run_dir)
    save_safetensors(run_dir / "adapters.safetensors", adapter_weights(model), metadata={"format": ADAPTER_FORMAT})
    if config is not None:
        write_json(run_dir / "adapter_config.json", config)


def read_adapter_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "adapter_config.json"
    if not path.exists():
        raise ValueError(f"{run_dir} has no adapter_config.json: not an mlx-mistral run directory")
    cfg = json.loads(path.read_text())
    if cfg.get("format") != ADAPTER_FORMAT or cfg.get("version") != 1:
        raise ValueError(f"{path}: format {cfg.get('format')!r} version {cfg.get('version')!r}; expected "
                         f"{ADAPTER_FORMAT!r} version 1")
    return cfg


def read_adapter_specs(run_dir: str | Path) -> tuple[dict, dict, Path]:
    """(adapter_config, {module: ModuleSpec}, path of adapters.safetensors) of a run directory; both
    backends read adapters through this."""
    run_dir = Path(run_dir)
    cfg = read_adapter_config(run_dir)
    specs = {name: ModuleSpec(int(m["rank"]), float(m["alpha"]), int(m["in"]), int(m["out"]))
             for name, m in cfg["modules"].items()}
    path = run_dir / "adapters.safetensors"
    if not path.exists():
        raise ValueError(f"{run_dir} has no adapters.safetensors")
    return cfg, specs, path


def check_adapter_tensors(path: Path, specs: dict, shapes: dict[str, tuple]):
    """Raise unless `shapes` (tensor name -> shape) holds exactly the lora_a (in, r) / lora_b (r, out)
    of every module in `specs`."""
    for name, s in specs.items():
        for leaf, shape in (("lora_a", (s.n_in, s.rank)), ("lora_b", (s.rank, s.n_out))):
            found = shapes.get(f"{name}.{leaf}")
            if found is None:
                raise ValueError(f"{path}: tensor {name}.{leaf} is missing")
            if tuple(found) != shape:
                raise ValueError(f"{path}: {name}.{leaf} has shape {tuple(found)}, adapter_config.json "
                                 f"says {shape}")
    extra = sorted(set(shapes) - {f"{n}.{leaf}" for n in specs for leaf in ("lora_a", "lora_b")})
    if extra:
        raise ValueError(f"{path}: unexpected tensors {', '.join(extra[:4])}")


def load_adapters(model: nn.Module, run_dir: str | Path, dropout: float | None = None) -> dict:
    """Add the adapters of a run directory to `model` (frozen), refusing any shape mismatch; returns the
    adapter config. Raises ValueError naming the module, the expected and the found shapes."""
    from .loader import load_safetensors

    cfg, specs, path = read_adapter_specs(run_dir)
    weights = load_safetensors(path)
    check_adapter_tensors(path, specs, {k: tuple(v.shape) for k, v in weights.items()})
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


def describe(specs: dict[str, ModuleSpec]) -> dict:
    """Rank / alpha / parameter totals per projection name, for reports."""
    out: dict[str, dict] = {}
    for name, s in specs.items():
        t = name.rsplit(".", 1)[1]
        d = out.setdefault(t, {"modules": 0, "rank": s.rank, "alpha": s.alpha, "params": 0})
        d["modules"] += 1
        d["params"] += s.params
    return out


__all__ = ["LoRALinear", "ModuleSpec", "apply_lora", "apply_specs", "load_adapters", "save_adapters", "fuse",
           "plan_modules", "policy_rank", "count_params", "adapter_config", "fingerprint"]
