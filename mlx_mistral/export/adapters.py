"""LoRA adapters between our run directory, PEFT and mlx-lm.

Orientation: ours and mlx-lm's store `lora_a` (in, r) and `lora_b` (r, out); PEFT stores
`lora_A.weight` (r, in) = lora_a.T and `lora_B.weight` (out, r) = lora_b.T, under
`base_model.model.<module>`. Scales: ours and PEFT's are alpha / r per module (PEFT's rsLoRA scales by
alpha / sqrt(r) and is imported with alpha * sqrt(r)); mlx-lm stores the scale itself, one for all
modules, so only adapters with one rank and one scale export to it.
PEFT per-module ranks go to `rank_pattern` / `alpha_pattern`, keyed by projection name when every layer
agrees and by full module name otherwise.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import mlx.core as mx

from ..backends.mlx.loader import load_safetensors, save_safetensors
from ..core.adapters import (ADAPTER_FORMAT, fingerprint, module_shape, pattern_value, policy_rank,
                             read_adapters)
from ..core.config import ModelArgs
from ..core.io import read_json, write_json
from ..core.rundir import claim

_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)")
PEFT_PREFIX = "base_model.model."


def _split(name: str) -> tuple[int, str]:
    m = _MODULE.fullmatch(name)
    if not m:
        raise ValueError(f"adapter module {name!r} is not a layer projection (model.layers.N.self_attn|mlp.X_proj)")
    return int(m.group(1)), m.group(3)


# ---- PEFT ---------------------------------------------------------------------------------------------
def _patterns(modules: dict, r: int, alpha: float) -> tuple[dict, dict]:
    """PEFT rank_pattern / alpha_pattern for modules whose rank or alpha differ from the defaults."""
    by_target: dict[str, set] = {}
    for name, m in modules.items():
        by_target.setdefault(_split(name)[1], set()).add((m["rank"], m["alpha"]))
    rank_p, alpha_p = {}, {}
    for name, m in modules.items():
        target = _split(name)[1]
        key = target if len(by_target[target]) == 1 else re.escape(name)
        if m["rank"] != r:
            rank_p[key] = m["rank"]
        if m["alpha"] != alpha:
            alpha_p[key] = m["alpha"]
    return rank_p, alpha_p


def export_peft(run_dir, out_dir, base_model: str | None = None) -> dict:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads."""
    cfg, _, weights = read_adapters(run_dir, mx.load)
    modules = cfg["modules"]
    if not modules:
        raise ValueError(f"{run_dir}: the adapter has no modules")
    r = Counter(m["rank"] for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m["alpha"] for m in modules.values()).most_common(1)[0][0]
    rank_p, alpha_p = _patterns(modules, r, alpha)
    layers = sorted({_split(n)[0] for n in modules})
    targets = sorted({_split(n)[1] for n in modules})
    full = {f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}"
            for i in layers for t in targets}
    if full == set(modules):  # a layers x targets grid: PEFT's compact form
        target_modules, layers_to_transform = targets, layers
    else:
        target_modules, layers_to_transform = sorted(modules), None
    tensors = {}
    for name in modules:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = weights[f"{name}.lora_a"].T  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = weights[f"{name}.lora_b"].T  # (out, r)
    out_dir = Path(out_dir)
    save_safetensors(out_dir / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or cfg.get("base_model"),
        "r": r, "lora_alpha": alpha, "lora_dropout": cfg.get("dropout", 0.0),
        "target_modules": target_modules, "layers_to_transform": layers_to_transform,
        "layers_pattern": "layers" if layers_to_transform is not None else None,
        "rank_pattern": rank_p, "alpha_pattern": alpha_p,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    write_json(out_dir / "adapter_config.json", peft_cfg)
    return {"out": str(out_dir), "modules": len(modules), "rank": r, "alpha": alpha,
            "rank_pattern": rank_p, "alpha_pattern": alpha_p}


def _policy_of(args: ModelArgs | None, modules: dict, rank: int, alpha: float) -> str:
    if args is None:
        return "uniform"
    for policy in ("uniform", "gqa"):
        if all((m["rank"], m["alpha"]) == policy_rank(args, _split(n)[1], rank, alpha, policy)
               for n, m in modules.items()):
            return policy
    return "uniform"  # per-module overrides: the "modules" table is the truth


def _write_run(run_dir, modules: dict, tensors: dict, args: ModelArgs | None, base_model: str, rank: int,
               alpha: float, dropout: float, source: str, overwrite: bool = False) -> dict:
    """An imported adapter as a run directory: refused when `run_dir` already holds a run, unless
    `overwrite` (which removes that run's files first; see core/rundir.py)."""
    layers = sorted({_split(n)[0] for n in modules})
    n_layers = args.num_hidden_layers if args else None
    num_layers = -1 if n_layers and layers == list(range(n_layers)) else (
        len(layers) if n_layers and layers == list(range(n_layers - len(layers), n_layers)) else -1)
    if args is not None:
        for name, m in modules.items():
            want = module_shape(args, _split(name)[1])
            if (m["in"], m["out"]) != want:
                raise ValueError(f"{source}: module {name} has (in, out) = ({m['in']}, {m['out']}), the base model "
                                 f"has {want}: the adapter belongs to another model")
            if _split(name)[0] >= args.num_hidden_layers:
                raise ValueError(f"{source}: module {name} is past the model's {args.num_hidden_layers} layers")
    cfg = {"format": ADAPTER_FORMAT, "version": 1, "base_model": base_model,
           "base_fingerprint": fingerprint(args) if args else "",
           "fine_tune": "lora", "targets": sorted({_split(n)[1] for n in modules}), "num_layers": num_layers,
           "rank_policy": _policy_of(args, modules, rank, alpha), "rank": rank, "alpha": alpha,
           "dropout": dropout, "modules": modules, "imported_from": source}
    with claim(run_dir, overwrite=overwrite):
        run_dir = Path(run_dir)
        save_safetensors(run_dir / "adapters.safetensors", tensors, metadata={"format": ADAPTER_FORMAT})
        write_json(run_dir / "adapter_config.json", cfg)
    return cfg


def import_peft(src_dir, run_dir, args: ModelArgs | None = None, overwrite: bool = False) -> dict:
    """A PEFT LoRA adapter directory (e.g. from TRL or Unsloth) -> our run directory; returns its config.
    `args` (the base model's) checks shapes and sets the fingerprint; an existing run in `run_dir` is
    refused unless `overwrite`."""
    src_dir = Path(src_dir)
    cfg_path = src_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise ValueError(f"{src_dir} has no adapter_config.json: not a PEFT adapter directory")
    pc = read_json(cfg_path)
    if pc.get("peft_type", "LORA").upper() != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {pc.get('peft_type')!r}; only LORA adapters can be imported")
    for key, bad, why in (("use_dora", True, "DoRA magnitudes are not supported"),
                          ("fan_in_fan_out", True, "fan_in_fan_out (Conv1D layers) does not apply to Mistral"),
                          ("modules_to_save", None, "fully trained modules (modules_to_save) are not LoRA")):
        v = pc.get(key)
        if (bad is True and v) or (bad is None and v):
            raise ValueError(f"{cfg_path}: {key} = {v!r}: {why}")
    if pc.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias = {pc['bias']!r}: trained biases are not supported (Mistral has none)")
    path = src_dir / "adapter_model.safetensors"
    if not path.exists():
        raise ValueError(f"{src_dir} has no adapter_model.safetensors (pickled adapter_model.bin is not read: "
                         "it can run code; re-save it with safetensors)")
    weights = load_safetensors(path)
    found: dict[str, dict] = {}
    for key, w in weights.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", key)
        if not m:
            raise ValueError(f"{path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        name = m.group(1)
        _split(name)
        found.setdefault(name, {})[m.group(2)] = w
    tensors, modules = {}, {}
    r0, alpha0 = int(pc.get("r", 8)), float(pc.get("lora_alpha", 8))
    for name, ab in sorted(found.items(), key=lambda kv: (_split(kv[0]), kv[0])):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {name} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]  # (r, in), (out, r)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a rank")
        r = int(a.shape[0])
        alpha = pattern_value(pc.get("alpha_pattern"), name)
        alpha = float(alpha if alpha is not None else alpha0)
        if pc.get("use_rslora"):
            alpha = alpha * r / math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); ours is alpha / r
        modules[name] = {"rank": r, "alpha": alpha, "in": int(a.shape[1]), "out": int(b.shape[0])}
        tensors[f"{name}.lora_a"] = a.T.astype(mx.float32)  # (in, r)
        tensors[f"{name}.lora_b"] = b.T.astype(mx.float32)  # (r, out)
    if not modules:
        raise ValueError(f"{path} holds no LoRA tensors")
    base = pc.get("base_model_name_or_path") or ""
    return _write_run(run_dir, modules, tensors, args, base, r0, alpha0, float(pc.get("lora_dropout", 0.0)),
                      str(src_dir), overwrite)


# ---- mlx-lm -------------------------------------------------------------------------------------------
def export_mlx_lm(run_dir, out_dir) -> dict:
    """Write mlx-lm's adapter directory (`mlx_lm.load(model, adapter_path=...)`, `mlx_lm.fuse`).
    mlx-lm has one rank and one scale for every module and adapts the last `num_layers` layers."""
    cfg, _, weights = read_adapters(run_dir, mx.load)
    modules = cfg["modules"]
    ranks = {m["rank"] for m in modules.values()}
    scales = {m["alpha"] / m["rank"] for m in modules.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"{run_dir}: modules have ranks {sorted(ranks)} and scales {sorted(scales)}; mlx-lm's "
                         "format has one rank and one scale. Export to PEFT instead (rank_pattern keeps them).")
    layers = sorted({_split(n)[0] for n in modules})
    keys = sorted({n.split(".", 3)[3] for n in modules})  # "self_attn.q_proj"
    grid = {f"model.layers.{i}.{k}" for i in layers for k in keys}
    if grid != set(modules) or layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"{run_dir}: mlx-lm adapts the same projections in the last N layers; this adapter's "
                         "modules do not form that grid")
    if cfg.get("num_layers", -1) == -1 and layers[0] != 0:
        raise ValueError(f"{run_dir}: adapter_config.json says all layers but layer 0 has no adapter")
    # mlx-lm adapts the last `num_layers` layers; ours were the last ones too (or all of them)
    mlx_cfg = {"fine_tune_type": "lora", "num_layers": len(layers),
               "lora_parameters": {"rank": ranks.pop(), "scale": scales.pop(), "dropout": cfg.get("dropout", 0.0),
                                   "keys": keys},
               "model": cfg.get("base_model")}
    out_dir = Path(out_dir)
    save_safetensors(out_dir / "adapters.safetensors", weights)
    write_json(out_dir / "adapter_config.json", mlx_cfg)
    return {"out": str(out_dir), "modules": len(modules), "num_layers": mlx_cfg["num_layers"]}


def import_mlx_lm(src_dir, run_dir, args: ModelArgs | None = None, overwrite: bool = False) -> dict:
    """mlx-lm's adapter directory (LoRA, not DoRA) -> our run directory (an existing run in `run_dir` is
    refused unless `overwrite`)."""
    src_dir = Path(src_dir)
    cfg_path = src_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise ValueError(f"{src_dir} has no adapter_config.json: not an mlx-lm adapter directory")
    mc = read_json(cfg_path)
    kind = mc.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ValueError(f"{cfg_path}: fine_tune_type {kind!r}; only 'lora' adapters can be imported")
    lp = mc.get("lora_parameters") or {}
    scale = float(lp.get("scale", 20.0))
    weights = load_safetensors(src_dir / "adapters.safetensors")
    modules, tensors = {}, {}
    for key, w in weights.items():
        m = re.fullmatch(r"(.+)\.lora_([ab])", key)
        if not m:
            raise ValueError(f"{src_dir}/adapters.safetensors: unexpected tensor {key!r} (DoRA '.m' and other "
                             "tensors are not supported)")
        name = m.group(1)
        _split(name)
        tensors[key] = w.astype(mx.float32)
        if m.group(2) == "a":  # (in, r)
            b = weights.get(f"{name}.lora_b")
            if b is None:
                raise ValueError(f"{src_dir}/adapters.safetensors: {name}.lora_b is missing")
            r = int(w.shape[1])
            modules[name] = {"rank": r, "alpha": scale * r, "in": int(w.shape[0]), "out": int(b.shape[1])}
    if not modules:
        raise ValueError(f"{src_dir}/adapters.safetensors holds no LoRA tensors")
    modules = dict(sorted(modules.items(), key=lambda kv: _split(kv[0])))
    r0 = next(iter(modules.values()))["rank"]
    return _write_run(run_dir, modules, tensors, args, str(mc.get("model") or ""), r0, scale * r0,
                      float(lp.get("dropout", 0.0)), str(src_dir), overwrite)
