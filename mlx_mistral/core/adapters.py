"""Adapter plans and files, shared by both backends: which modules get which rank, and the run directory.

Notable:
- Rank policies are pure functions of `ModelArgs` (`plan_modules`): `uniform` gives every module rank r;
  `gqa` keeps r on q/o (and the MLP) and gives k/v r * n_kv / n_heads, never below a floor, with alpha
  scaled so every module's alpha/r is the user's. PEFT's `rank_pattern`/`alpha_pattern` override both.
  Adapters always take the real shape of the projection: under GQA `k_proj`/`v_proj` map
  hidden -> n_kv_heads * head_dim.
- Mixtral: LoRA goes on the attention projections; the router (`block_sparse_moe.gate`) and the stacked
  experts get none (no export path carries expert adapters).
- The adapter file stores `lora_a` (in, r) and `lora_b` (r, out), mlx-lm's orientation; PEFT's lora_A is
  lora_a.T and lora_B is lora_b.T. `adapter_config.json` lists every module with its rank, alpha and shape,
  and the fingerprint of the base model's architecture. A run directory written by one backend loads in
  the other: both read and write it through this module.
The LoRA layers themselves are tensor code: `backends/mlx/lora.py`, `backends/torch/lora.py`.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ModelArgs
from .io import read_json, read_safetensors, save_safetensors, write_json

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION + MLP
POLICIES = ("uniform", "gqa")
ADAPTER_FORMAT = "mlx-mistral-lora"


# ---- which modules get which rank: pure functions --------------------------------------------------
def lora_scale(rank: int, alpha: float) -> tuple[int, float, float]:
    """(rank, alpha, scale) of one adapter, y = base(x) + scale * x @ A @ B with scale = alpha / rank;
    ValueError for a rank below 1."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return int(rank), float(alpha), float(alpha) / int(rank)


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


def pattern_value(pattern: dict | None, name: str):
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
            pr, pa = pattern_value(rank_pattern, name), pattern_value(alpha_pattern, name)
            if pr is not None:
                r, a = int(pr), float(alpha)
            if pa is not None:
                a = float(pa)
            if r < 1:
                raise ValueError(f"rank of {name} must be >= 1, got {r} (from rank_pattern)")
            n_in, n_out = module_shape(args, t)
            if r > min(n_in, n_out):
                raise ValueError(f"rank {r} of {name} is above its smaller dimension min(in, out) = "
                                 f"{min(n_in, n_out)}: a LoRA update of (in, out) = ({n_in}, {n_out}) has rank at "
                                 f"most {min(n_in, n_out)}; lower lora_rank (or its rank_pattern entry)")
            out[name] = ModuleSpec(r, a, n_in, n_out)
    for key_name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unused = [k for k in (pattern or {}) if not any(re.match(rf"(.*\.)?({k})$", n) for n in out)]
        if unused:
            example = next(iter(out), "model.layers.0.self_attn.q_proj")
            raise ValueError(f"{key_name} entr{'y' if len(unused) == 1 else 'ies'} {', '.join(map(repr, unused))} "
                             f"match no adapted module (module names look like {example!r}; a key matches the end "
                             "of a name, as a regex, as in PEFT)")
    return out


def count_params(specs: dict[str, ModuleSpec]) -> int:
    """Trainable LoRA parameters of a plan."""
    return sum(s.params for s in specs.values())


def plan_for_config(args: ModelArgs, cfg) -> dict[str, ModuleSpec]:
    """`plan_modules` with the LoRA settings of a `TrainConfig`."""
    return plan_modules(args, cfg.targets, cfg.num_layers, cfg.lora_rank, cfg.lora_alpha, cfg.rank_policy,
                        cfg.rank_floor, cfg.rank_pattern or None, cfg.alpha_pattern or None)


def wrap_modules(specs: dict[str, ModuleSpec], get: Callable, shape_of: Callable, adapted: type, wrap: Callable):
    """Put an adapter on every module of a plan, each checked against the model first: `get(name)` finds
    the module (AttributeError, IndexError or KeyError when there is none), `shape_of(module)` gives its
    (in, out), a module already of type `adapted` is refused, and `wrap(i, name, module, spec)` replaces it
    (i: the module's index in the plan, for per-module seeds)."""
    for i, (name, spec) in enumerate(specs.items()):
        try:
            base = get(name)
        except (AttributeError, IndexError, KeyError):
            raise ValueError(f"adapter module {name} does not exist in this model") from None
        if isinstance(base, adapted):
            raise ValueError(f"{name} already has a LoRA adapter")
        found = shape_of(base)
        if found != (spec.n_in, spec.n_out):
            raise ValueError(f"adapter module {name}: expected (in, out) = ({spec.n_in}, {spec.n_out}) by the "
                             f"adapter, found {found} in the model: the adapter belongs to another model")
        wrap(i, name, base, spec)


# ---- the run directory -----------------------------------------------------------------------------
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


def config_for(specs: dict[str, ModuleSpec], cfg, model_name: str, args: ModelArgs) -> dict:
    """`adapter_config` of a plan made from a `TrainConfig` (what a training run writes)."""
    return adapter_config(specs, base_model=model_name, args=args, targets=cfg.targets, num_layers=cfg.num_layers,
                          policy=cfg.rank_policy, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


def save_adapters(run_dir: str | Path, arrays: dict, config: dict | None = None):
    """Write `adapters.safetensors` (numpy arrays: `{module.lora_a|lora_b: array}`) and, when given,
    `adapter_config.json` into `run_dir`, atomically."""
    run_dir = Path(run_dir)
    save_safetensors(run_dir / "adapters.safetensors", arrays, metadata={"format": ADAPTER_FORMAT})
    if config is not None:
        write_json(run_dir / "adapter_config.json", config)


def read_adapter_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "adapter_config.json"
    if not path.exists():
        raise ValueError(f"{run_dir} has no adapter_config.json: not an mlx-mistral run directory")
    cfg = read_json(path)
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


def describe(specs: dict[str, ModuleSpec]) -> dict:
    """Rank / alpha / parameter totals per projection name, for reports."""
    out: dict[str, dict] = {}
    for name, s in specs.items():
        t = name.rsplit(".", 1)[1]
        d = out.setdefault(t, {"modules": 0, "rank": s.rank, "alpha": s.alpha, "params": 0})
        d["modules"] += 1
        d["params"] += s.params
    return out


def read_adapters(run_dir: str | Path, read: Callable) -> tuple[dict, dict[str, ModuleSpec], dict]:
    """(adapter_config, {module: ModuleSpec}, tensors) of a run directory, the tensors read with `read` (a
    backend's safetensors reader) and checked: exactly each module's lora_a (in, r) and lora_b (r, out)."""
    cfg, specs, path = read_adapter_specs(run_dir)
    weights = read_safetensors(path, read)
    check_adapter_tensors(path, specs, {k: tuple(v.shape) for k, v in weights.items()})
    return cfg, specs, weights


@contextlib.contextmanager
def adapters_off(model, set_enabled: Callable):
    """Inside: every adapter of `model` switched off with a backend's `set_enabled(model, on)`, so the
    model computes its base model (DPO's reference); switched back on when leaving, also on error."""
    set_enabled(model, False)
    try:
        yield model
    finally:
        set_enabled(model, True)
