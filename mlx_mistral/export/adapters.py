"""LoRA adapters between our run directory, PEFT and mlx-lm.

Orientation: ours and mlx-lm's store `lora_a` (in, r) and `lora_b` (r, out); PEFT stores
`lora_A.weight` (r, in) = lora_a.T and `lora_B.weight` (out, r) = lora_b.T, under
`base_model.model.<module>`. Scales: ours and PEFT's are alpha / r per module (PEFT's rsLoRA scales by
alpha / sqrt(r) and is imported with alpha * sqrt(r)); mlx-lm stores the scale itself, one rank and one
scale for all modules: per-module ranks are zero-padded to the largest and other scales folded into lora_b.
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
MLX_LM_RECORD = "mlx_mistral"  # our key in mlx-lm's adapter_config.json (mlx-lm ignores keys it does not read)


def _mlx_lm_layers(cfg: dict, layers: list[int], args: ModelArgs | None, run_dir) -> tuple[int, list[int]]:
    """(mlx-lm's `num_layers`, the layers it then adapts). mlx-lm adapts the last `num_layers` layers
    (-1: all of them); ours may adapt any set, so the adapted span runs from our first layer to the last."""
    if args is not None:
        n = args.num_hidden_layers
        if cfg.get("base_fingerprint") and cfg["base_fingerprint"] != fingerprint(args):
            raise ValueError(f"{run_dir}: the adapter was trained on another base model (fingerprint "
                             f"{cfg['base_fingerprint']}, the given model has {fingerprint(args)})")
        if layers[-1] >= n:
            raise ValueError(f"{run_dir}: the adapter has layer {layers[-1]}, the base model {n} layers")
        return (-1 if layers[0] == 0 else n - layers[0]), list(range(layers[0], n))
    if layers[0] == 0:  # every layer from the first: mlx-lm's -1 (any layer past ours gets mlx-lm's B = 0)
        return -1, list(range(layers[-1] + 1))
    trained = cfg.get("num_layers", -1)  # the run adapted its last `trained` layers
    if trained > 0 and layers[-1] - layers[0] < trained:
        return trained, list(range(layers[-1] - trained + 1, layers[-1] + 1))
    raise ValueError(f"{run_dir}: the adapter starts at layer {layers[0]} and its config does not say how many "
                     "layers the base model has; give the base model (--model) so the export can place the "
                     "layers mlx-lm adapts (the last num_layers)")


def export_mlx_lm(run_dir, out_dir, args: ModelArgs | None = None) -> dict:
    """Write mlx-lm's adapter directory (`mlx_lm.load(model, adapter_path=...)`, `mlx_lm.fuse`).

    mlx-lm has one rank R and one scale S for every module, on the same projections (`keys`) of the last
    `num_layers` layers. Per-module ranks (the `gqa` policy, rank_pattern) are zero-padded up to R: lora_a
    (in, r) gets R - r zero columns and lora_b (r, out) R - r zero rows, so x @ A @ B is unchanged. A module
    whose scale s = alpha / r differs from S has s / S folded into its lora_b. A projection the run did not
    adapt in a layer mlx-lm adapts gets zero tensors. The result computes the same function as the run.
    Each module's own rank and alpha are recorded under "mlx_mistral" so `import_mlx_lm` restores them.
    `args` (the base model's) checks the fingerprint and gives the layer count; without it the run's config
    must place the layers."""
    cfg, specs, weights = read_adapters(run_dir, mx.load)
    modules = cfg["modules"]
    if not modules:
        raise ValueError(f"{run_dir}: the adapter has no modules")
    layers = sorted({_split(n)[0] for n in modules})
    keys = sorted({n.split(".", 3)[3] for n in modules})  # "self_attn.q_proj"
    num_layers, span = _mlx_lm_layers(cfg, layers, args, run_dir)
    rank = max(s.rank for s in specs.values())
    scales = Counter(s.alpha / s.rank for s in specs.values())
    scale = max(scales, key=lambda s: (scales[s], s))  # the most common: those modules' lora_b are unchanged
    shape = {n.split(".", 3)[3]: (s.n_in, s.n_out) for n, s in specs.items()}
    dtype = next(iter(weights.values())).dtype
    tensors, padded, folded, zero = {}, 0, 0, 0
    for i in span:
        for key in keys:
            name = f"model.layers.{i}.{key}"
            n_in, n_out = shape[key]
            s = specs.get(name)
            if s is None:
                a, b = mx.zeros((n_in, rank), dtype), mx.zeros((rank, n_out), dtype)  # (in, R), (R, out)
                zero += 1
            else:
                a, b = weights[f"{name}.lora_a"], weights[f"{name}.lora_b"]  # (in, r), (r, out)
                if s.alpha / s.rank != scale:
                    b = (b.astype(mx.float32) * (s.alpha / s.rank / scale)).astype(b.dtype)  # (r, out)
                    folded += 1
                if s.rank < rank:
                    a = mx.concatenate([a, mx.zeros((n_in, rank - s.rank), a.dtype)], axis=1)  # (in, R)
                    b = mx.concatenate([b, mx.zeros((rank - s.rank, n_out), b.dtype)], axis=0)  # (R, out)
                    padded += 1
            tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a, b
    mlx_cfg = {"fine_tune_type": "lora", "num_layers": num_layers,
               "lora_parameters": {"rank": rank, "scale": scale, "dropout": cfg.get("dropout", 0.0), "keys": keys},
               "model": cfg.get("base_model"),
               MLX_LM_RECORD: {"format": ADAPTER_FORMAT, "base_fingerprint": cfg.get("base_fingerprint", ""),
                               "modules": {n: {"rank": m["rank"], "alpha": m["alpha"]} for n, m in modules.items()}}}
    out_dir = Path(out_dir)
    save_safetensors(out_dir / "adapters.safetensors", tensors)
    write_json(out_dir / "adapter_config.json", mlx_cfg)
    return {"out": str(out_dir), "modules": len(modules), "num_layers": num_layers, "rank": rank, "scale": scale,
            "padded": padded, "scale_folded": folded, "zero_modules": zero}


def _unpad(name: str, a, b, record: dict | None, scale: float, where: str):
    """(lora_a, lora_b, rank, alpha) of one module read from mlx-lm: trimmed back to the rank recorded by
    `export_mlx_lm` when the padding is still zero (training in mlx-lm may have filled it)."""
    r = int(a.shape[1])  # a: (in, R), b: (R, out)
    if record is not None:
        r0 = int(record["rank"])
        if r0 > r:
            raise ValueError(f"{where}: {name} has rank {r}, its recorded rank is {r0}")
        if not (mx.any(a[:, r0:] != 0).item() or mx.any(b[r0:] != 0).item()):
            a, b, r = a[:, :r0], b[:r0], r0  # (in, r0), (r0, out)
        alpha = float(record["alpha"])
        if alpha / r == scale:
            return a, b, r, alpha
    return a, b, r, scale * r  # a scale folded into lora_b at export stays there: the same function


def import_mlx_lm(src_dir, run_dir, args: ModelArgs | None = None, overwrite: bool = False) -> dict:
    """mlx-lm's adapter directory (LoRA, not DoRA) -> our run directory. An export of ours gets its
    per-module ranks back; modules it zero-filled and that are still zero are dropped. An existing run in `run_dir` is refused unless `overwrite`."""
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
    recorded = (mc.get(MLX_LM_RECORD) or {}).get("modules")
    where = f"{src_dir}/adapters.safetensors"
    weights = load_safetensors(src_dir / "adapters.safetensors")
    modules, tensors = {}, {}
    for key, w in weights.items():
        m = re.fullmatch(r"(.+)\.lora_([ab])", key)
        if not m:
            raise ValueError(f"{where}: unexpected tensor {key!r} (DoRA '.m' and other tensors are not supported)")
        name = m.group(1)
        _split(name)
        if m.group(2) == "b":
            continue
        b = weights.get(f"{name}.lora_b")
        if b is None:
            raise ValueError(f"{where}: {name}.lora_b is missing")
        record = recorded.get(name) if recorded is not None else None
        if recorded is not None and record is None and not (mx.any(w != 0).item() or mx.any(b != 0).item()):
            continue  # zero-filled by our export and never trained
        a, b, r, alpha = _unpad(name, w, b, record, scale, where)
        modules[name] = {"rank": r, "alpha": alpha, "in": int(a.shape[0]), "out": int(b.shape[1])}
        tensors[f"{name}.lora_a"] = a.astype(mx.float32)  # (in, r)
        tensors[f"{name}.lora_b"] = b.astype(mx.float32)  # (r, out)
    if not modules:
        raise ValueError(f"{where} holds no LoRA tensors")
    modules = dict(sorted(modules.items(), key=lambda kv: _split(kv[0])))
    r0 = max(m["rank"] for m in modules.values())  # policies lower some ranks (gqa: k/v), never raise them
    alpha0 = next(m["alpha"] for m in modules.values() if m["rank"] == r0)
    return _write_run(run_dir, modules, tensors, args, str(mc.get("model") or ""), r0, alpha0,
                      float(lp.get("dropout", 0.0)), str(src_dir), overwrite)
