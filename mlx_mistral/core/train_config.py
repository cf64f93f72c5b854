"""The training configuration: every key with its type, range, default and help text, in one place.

YAML presets, `--config` files, CLI flags and `finetune(config)` all go through `TrainConfig.from_dict`,
which coerces values the way people write them and rejects the rest with a message naming the key:
- YAML 1.1 (PyYAML) reads `lr: 1e-4` as the *string* "1e-4" (it needs a dot: `1.0e-4`); numeric strings
  become numbers for numeric keys.
- Integers are accepted for float keys; a float with an integral value (`steps: 1000.0`) for int keys;
  booleans are never numbers (`seq_len: true` is an error).
- Ranges and choices are checked per key, then the combinations (`full` fine-tuning with `quantize`).

`resume` says what `--resume` may change: "free" keys (how long, the learning-rate schedule and clipping,
how often to log/eval/save, which backend and whether to compile or checkpoint layers) may differ from the
run's saved config and are recorded in metrics.jsonl (a "resume" event; the run is then no longer the
bit-exact continuation of the old settings, by the user's choice);
"fixed" keys decide what the checkpoint holds or which rows each step sees, so a difference is refused
before anything is written; `model` may name another path or id of the same model ("fingerprint": the
architecture hash of the checkpoint is compared instead).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def key(default, help: str, *, kind: str, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_open: bool = False, max_open: bool = False, nullable: bool = False,
        resume: str = "fixed"):
    """A config key's spec (kept in the dataclass field's metadata)."""
    spec = dict(help=help, kind=kind, choices=choices, min=min, max=max, min_open=min_open, max_open=max_open,
                nullable=nullable, resume=resume)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=spec)
    return field(default=default, metadata=spec)


@dataclass
class TrainConfig:
    """Every training setting and its default (the one place defaults live; YAML and flags override)."""

    # ---- model
    model: str = key("", "Model directory, Hugging Face repo id, or tiny:<preset> (a random model built on the "
                         "fly)", kind="str", resume="fingerprint")
    backend: str = key("auto", "auto: MLX on Apple silicon, torch elsewhere when installed", kind="str",
                       choices=("auto", "mlx", "torch"), resume="free")
    quantize: int | None = key(None, "Quantize the base at load to 4 or 8 bits (QLoRA)", kind="int",
                               choices=(4, 8), nullable=True)
    quantize_group_size: int = key(64, "Group size of the quantization", kind="int", choices=(32, 64, 128))
    dtype: str = key("auto", "Base weights' dtype (adapters and optimizer state are fp32 regardless). auto: the "
                             "checkpoint's (config.json torch_dtype / dtype), but float32 where the backend is slow "
                             "in it (bf16/fp16 on MLX's CPU, fp16 on torch's CPU); the start event says which and why",
                     kind="str", choices=("auto", "float32", "bfloat16", "float16"))
    # ---- data
    data: str = key("", "Dataset: a directory with train.jsonl (valid.jsonl, test.jsonl optional), a .jsonl or "
                        ".parquet file, or a Hugging Face Hub dataset id owner/name[@revision] (its JSONL / Parquet "
                        "files of the train and valid splits)", kind="str")
    datasets: list = key([], "Several sources mixed, instead of data: a list of entries {path: a local dataset or "
                             "Hub id, split: train, valid_split: valid (null: none), revision: null, weight: 1.0, "
                             "format: null (jsonl / parquet)}; weight w uses each document of the source w times "
                             "per epoch (0.5: a seeded half), deterministic given seed", kind="datasets")
    seq_len: int = key(2048, "Tokens per packed row", kind="int", min=2)
    packing: str = key("swa", "swa: documents isolated (segment ids, positions, window); naive: concatenate "
                              "and cut; none: one document per row, padded", kind="str",
                       choices=("swa", "naive", "none"))
    overlap: int = key(0, "Tokens shared by consecutive chunks of a document longer than a row", kind="int", min=0)
    loss_on: str = key("default", "Which tokens the loss covers, per record shape. default: chat -> every "
                                  "assistant turn (with its EOS), prompt/completion -> the completion (with EOS), "
                                  "text -> all; last: chat -> the last assistant turn only, prompt/completion -> "
                                  "the completion, text -> all; all: every token (system and user turns, prompts)",
                       kind="str", choices=("default", "last", "all"))
    # ---- what to train
    fine_tune: str = key("lora", "The objective and, for SFT, what is trained. lora: supervised (SFT) adapters; "
                                 "full: SFT of every parameter; dpo / orpo: preference tuning on "
                                 '{"prompt", "chosen", "rejected"} data, training what pref_weights says',
                         kind="str", choices=("lora", "full", "dpo", "orpo"))
    pref_weights: str = key("lora", "What dpo / orpo train: lora (adapters; QLoRA with quantize; DPO's reference is "
                                    "the base with the adapters switched off, in the same step) or full (every "
                                    "parameter; DPO's reference log-probs are computed once before step 1 and "
                                    "cached with the tokenized data)", kind="str", choices=("lora", "full"))
    beta: float = key(0.1, "dpo / orpo: DPO's KL strength (reward = beta * log-ratio to the reference); ORPO's "
                           "weight of the odds-ratio term", kind="float", min=0, min_open=True)
    dpo_loss: str = key("sigmoid", "DPO loss as TRL names it: sigmoid (the DPO paper), robust (Robust DPO, "
                                   "unbiased under label noise label_smoothing) or cdpo (conservative DPO: sigmoid "
                                   "with smoothed labels)", kind="str", choices=("sigmoid", "robust", "cdpo"))
    label_smoothing: float = key(0.0, "DPO: assumed probability that a pair's labels are flipped (robust, cdpo "
                                      "only: TRL's sigmoid ignores it, so it is refused there)", kind="float",
                                 min=0, max=0.5, max_open=True)
    targets: list | str = key("all-linear", "Projections that get adapters: a list of q_proj k_proj v_proj "
                                            "o_proj gate_proj up_proj down_proj, or all-linear", kind="targets")
    num_layers: int = key(-1, "Adapt the last N layers; -1 = all", kind="int", min=-1)
    lora_rank: int = key(16, "LoRA rank r", kind="int", min=1)
    lora_alpha: float = key(32.0, "LoRA alpha (the adapter's scale is alpha / r)", kind="float", min=0,
                            min_open=True)
    lora_dropout: float = key(0.0, "Dropout on the adapters' input", kind="float", min=0, max=1, max_open=True)
    rank_policy: str = key("uniform", "uniform: rank r everywhere; gqa: k/v get r * n_kv_heads / n_heads "
                                      "(alpha/r kept)", kind="str", choices=("uniform", "gqa"))
    rank_floor: int = key(4, "Lowest rank the gqa policy gives k/v", kind="int", min=1)
    rank_pattern: dict = key({}, "PEFT-style per-module rank overrides {module regex: rank}", kind="pattern")
    alpha_pattern: dict = key({}, "PEFT-style per-module alpha overrides {module regex: alpha}", kind="pattern")
    # ---- optimisation
    steps: int = key(1000, "Optimizer steps", kind="int", min=1, resume="free")
    batch_size: int = key(4, "Rows per micro-step (per process)", kind="int", min=1)
    grad_accum: int = key(1, "Micro-steps accumulated per optimizer step", kind="int", min=1)
    # Peak LR 1.4e-4: 30% below the usual Llama-2 LoRA recipe's 2e-4. A published claim for the Mistral
    # family that we adopt as a hypothesis (the thesis experiment tests it), not a measured optimum.
    # DPO / ORPO (null = the objective's default): 5e-6 for adapters (alignment-handbook's zephyr-7b-dpo-qlora
    # recipe), 1e-6 for full (TRL's DPOConfig default). Taken from those recipes, not measured here.
    lr: float = key(None, "Peak learning rate; null = the objective's default: 1.4e-4 for SFT, 5e-6 for dpo / "
                          "orpo adapters, 1e-6 for full dpo / orpo", kind="float", min=0, nullable=True,
                    resume="free")
    warmup_steps: int = key(50, "Linear warm-up steps", kind="int", min=0, resume="free")
    min_lr_ratio: float = key(0.1, "Final learning rate of the cosine schedule, as a fraction of lr", kind="float",
                              min=0, max=1, resume="free")
    weight_decay: float = key(0.01, "AdamW's decoupled weight decay", kind="float", min=0, resume="free")
    beta1: float = key(0.9, "AdamW beta1", kind="float", min=0, max=1, max_open=True)
    beta2: float = key(0.999, "AdamW beta2", kind="float", min=0, max=1, max_open=True)
    eps: float = key(1e-8, "AdamW epsilon", kind="float", min=0, min_open=True)
    bias_correction: bool = key(True, "AdamW bias correction (PyTorch's and HF's behaviour)", kind="bool")
    grad_clip: float = key(1.0, "Clip the global gradient norm to this; 0 = off", kind="float", min=0, resume="free")
    grad_checkpoint: bool = key(False, "Recompute each layer in the backward pass instead of storing its "
                                       "activations", kind="bool", resume="free")
    attention: str = key("auto", "Attention in training and full forward passes. blockwise: queries in blocks, each "
                                 "attending only to the key band it can see (window, document start), so memory "
                                 "grows linearly with the row; dense: one (L, L) masked score matrix per layer "
                                 "(faster for short rows); auto: dense below 1024 tokens per row, blockwise above. "
                                 "The start event says which was used", kind="str",
                         choices=("auto", "dense", "blockwise"), resume="free")
    attention_block: int | None = key(None, "Query block size of blockwise attention; null = about half the "
                                            "window, a power of two in 64..512 (without a window: 512, "
                                            "shrinking for rows over 8k tokens)", kind="int",
                                      min=1, nullable=True, resume="free")
    compile: bool = key(True, "Compile the training step (mx.compile; torch.compile on CUDA)", kind="bool",
                        resume="free")
    seed: int = key(0, "Seed of the data order, adapter initialisation and dropout", kind="int", min=0)
    # ---- evaluation, saving, logging
    val_fraction: float = key(0.05, "Rows held out for validation when the data has no valid split",
                              kind="float", min=0, max=1, max_open=True)
    eval_every: int = key(100, "Evaluate every N steps; 0 = never", kind="int", min=0, resume="free")
    eval_rows: int = key(256, "Validation rows per evaluation (the first ones); 0 = all", kind="int", min=0,
                         resume="free")
    save_every: int = key(100, "Checkpoint every N steps; 0 = only at the end (and on Ctrl-C / SIGTERM)",
                          kind="int", min=0, resume="free")
    keep_checkpoints: int = key(3, "Complete checkpoints kept (the newest verified one is always kept)",
                                kind="int", min=1, resume="free")
    log_every: int = key(1, "Report training metrics every N steps", kind="int", min=1, resume="free")
    report_to: list = key([], "Experiment loggers beside the dashboard and metrics.jsonl: wandb (Weights & Biases; "
                              "the wandb extra; WANDB_MODE=offline works without an account) and/or tensorboard "
                              "(event files in <out>/tensorboard; the tensorboard extra)", kind="list",
                          choices=("wandb", "tensorboard"), resume="free")
    wandb_project: str = key("mlx-mistral", "The Weights & Biases project of report_to: wandb", kind="str",
                             resume="free")
    out: str = key("runs/latest", "Run directory (adapters, checkpoints, metrics.jsonl, config.yaml)", kind="str",
                   resume="free")

    def __post_init__(self):
        if self.lr is None:
            self.lr = DEFAULT_LR[(self.objective, self.trains_full)]

    @property
    def objective(self) -> str:
        """sft, dpo or orpo."""
        return self.fine_tune if self.fine_tune in ("dpo", "orpo") else "sft"

    @property
    def trains_full(self) -> bool:
        """Every parameter trained (full SFT, or dpo / orpo with pref_weights: full) rather than adapters."""
        return self.fine_tune == "full" or (self.objective != "sft" and self.pref_weights == "full")

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, source: str = "config") -> "TrainConfig":
        """A validated config from a mapping (YAML, flags); unknown keys, wrong types and ranges raise
        ValueError naming the key and `source`."""
        data = dict(data or {})
        specs = specs_by_name()
        unknown = sorted(set(data) - set(specs))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                             f"{', '.join(specs)}")
        values = {k: coerce(k, v, source) for k, v in data.items()}
        return cls(**values).check(source)

    def check(self, source: str = "config") -> "TrainConfig":
        """Every key's type and range (again, for configs built in code), then the combinations."""
        for name in specs_by_name():
            coerce(name, getattr(self, name), source)
        if self.trains_full and self.quantize:
            what = "fine_tune: full" if self.fine_tune == "full" else "pref_weights: full"
            raise ValueError(f"{source}: keys '{what}' and 'quantize' conflict: full fine-tuning keeps "
                             "fp32 master weights; drop 'quantize' or train adapters (lora)")
        if self.objective == "sft":
            changed = [k for k in ("pref_weights", "beta", "dpo_loss", "label_smoothing")
                       if getattr(self, k) != specs_by_name()[k]["default"]]
            if changed:
                raise ValueError(f"{source}: key(s) {', '.join(map(repr, changed))} apply to preference tuning "
                                 f"only, not to 'fine_tune: {self.fine_tune}'; set fine_tune: dpo or orpo")
        if self.objective == "orpo" and (self.dpo_loss != "sigmoid" or self.label_smoothing):
            raise ValueError(f"{source}: keys 'dpo_loss' / 'label_smoothing' are DPO's; ORPO has one loss "
                             "(drop them or use fine_tune: dpo)")
        if self.objective == "dpo" and self.dpo_loss == "sigmoid" and self.label_smoothing:
            raise ValueError(f"{source}: key 'label_smoothing' = {self.label_smoothing} has no effect on "
                             "dpo_loss 'sigmoid' (TRL 1.16 ignores it there); use dpo_loss: robust or cdpo")
        if self.data and self.datasets:
            raise ValueError(f"{source}: keys 'data' and 'datasets' conflict: set one (a single dataset, or a "
                             "list of sources to mix)")
        if self.num_layers == 0:
            raise ValueError(f"{source}: key 'num_layers' = 0: must be -1 (all layers) or a positive count")
        return self

    validate = check  # the name the first wave used

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_absolute_paths(self, base: str | Path | None = None) -> "TrainConfig":
        """The same config with `model`, `data` and `out` made absolute where they name local paths, so a
        saved run resumes from any working directory (a Hub id or tiny:<preset> stays as it is)."""
        base = Path(base or Path.cwd())
        out = {}

        def absolute(k, v):
            p = Path(v).expanduser()
            if k == "out" or p.exists() or v.startswith((".", "/", "~")) or v.count("/") != 1:
                return str((base / p).resolve() if not p.is_absolute() else p)
            return v

        for k in ("model", "data", "out"):
            v = getattr(self, k)
            if v and not v.startswith("tiny:"):
                out[k] = absolute(k, v)
        out["datasets"] = [dict(e, path=absolute("data", e["path"])) for e in self.datasets]
        return dataclasses.replace(self, **out)


DEFAULT_LR = {("sft", False): 1.4e-4, ("sft", True): 1.4e-4, ("dpo", False): 5e-6, ("orpo", False): 5e-6,
              ("dpo", True): 1e-6, ("orpo", True): 1e-6}


def specs_by_name() -> dict[str, dict]:
    """{key: spec} in declaration order (help text, kind, range, choices, resume rule)."""
    return {f.name: dict(f.metadata, default=(f.default if f.default is not dataclasses.MISSING
                                              else f.default_factory()))
            for f in dataclasses.fields(TrainConfig)}


def describe(spec: dict) -> str:
    """What a key accepts, in words (for error messages and --help)."""
    if spec["choices"] and spec["kind"] == "list":
        what = f"a list of {', '.join(map(str, spec['choices']))}"
    elif spec["choices"]:
        what = " or ".join(map(str, spec["choices"]))
    else:
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "targets": "a list of projection names or all-linear",
                "pattern": "a mapping {module regex: number}",
                "datasets": "a list of dataset paths / Hub ids, or of {path, split, valid_split, revision, weight, "
                            "format} entries"}[spec["kind"]]
        lo, hi = spec["min"], spec["max"]
        if lo is not None and hi is not None:
            what += f" in {'(' if spec['min_open'] else '['}{lo:g}, {hi:g}{')' if spec['max_open'] else ']'}"
        elif lo is not None:
            what += f" {'>' if spec['min_open'] else '>='} {lo:g}"
        elif hi is not None:
            what += f" {'<' if spec['max_open'] else '<='} {hi:g}"
    return what + (" (or null)" if spec["nullable"] else "")


def coerce(name: str, value: Any, source: str = "config") -> Any:
    """`value` as key `name`'s type, or ValueError naming the key, the value and what it accepts."""
    spec = specs_by_name()[name]
    kind = spec["kind"]

    def bad(extra: str = ""):
        return ValueError(f"{source}: key {name!r} = {value!r}: must be {describe(spec)}{extra}")

    if value is None:
        if spec["nullable"]:
            return None
        raise bad()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise bad()
    if kind in ("int", "float"):
        v = value
        if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
            v = float(v) if kind == "float" or not v.strip().lstrip("+-").isdigit() else int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        if kind == "int":
            if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
                raise bad()
            v = int(v)
        else:
            v = float(v)
            if not math.isfinite(v):
                raise bad()
        _range(spec, v, bad)
        return v
    if kind == "str":
        if not isinstance(value, str):
            raise bad()
        if spec["choices"] and value not in spec["choices"]:
            raise bad()
        return value
    if kind == "targets":
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
            return list(value)
        raise bad()
    if kind == "pattern":
        if not isinstance(value, dict):
            raise bad()
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise bad(f" (entry {k!r}: {v!r})")
            try:
                num = float(v)
            except ValueError:
                raise bad(f" (entry {k!r}: {v!r})") from None
            if not math.isfinite(num) or num <= 0:
                raise bad(f" (entry {k!r} must be > 0)")
            try:
                re.compile(k)
            except re.error as e:
                raise bad(f" (entry {k!r} is not a valid regex: {e})") from None
            out[k] = int(num) if name == "rank_pattern" else num
            if name == "rank_pattern" and not num.is_integer():
                raise bad(f" (entry {k!r}: a rank is an integer)")
        return out
    if kind == "datasets":
        return _sources(value, bad)
    if kind == "list":  # a list of names from `choices` (a bare string is a list of one)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or any(x not in spec["choices"] for x in items):
            raise bad()
        return list(dict.fromkeys(items))
    raise AssertionError(f"unknown kind {kind!r}")  # a programming error, not input


SOURCE_DEFAULTS = {"path": None, "split": "train", "valid_split": "valid", "revision": None, "weight": 1.0,
                   "format": None}


def _sources(value, bad) -> list[dict]:
    """The `datasets` list with every entry complete (a bare string is {path: it}), so config.yaml records
    what was read; ValueError naming the entry and its bad field."""
    if not isinstance(value, (list, tuple)):
        raise bad()
    out = []
    for i, e in enumerate(value):
        e = {"path": e} if isinstance(e, str) else e
        if not isinstance(e, dict):
            raise bad(f" (entry {i} is {type(e).__name__})")
        unknown = sorted(set(e) - set(SOURCE_DEFAULTS))
        if unknown:
            raise bad(f" (entry {i}: unknown field(s) {', '.join(unknown)}; known: {', '.join(SOURCE_DEFAULTS)})")
        e = {**SOURCE_DEFAULTS, **e}
        if not isinstance(e["path"], str) or not e["path"]:
            raise bad(f" (entry {i} needs 'path': a local dataset or a Hub dataset id)")
        for k in ("split", "valid_split", "revision"):
            if e[k] is not None and (not isinstance(e[k], str) or not e[k]):
                raise bad(f" (entry {i}: {k!r} must be a non-empty string{'' if k == 'split' else ' or null'})")
        if e["split"] is None:
            raise bad(f" (entry {i}: 'split' must be a split name such as train)")
        w = e["weight"]
        if isinstance(w, str) and _NUMBER.fullmatch(w.strip()):
            w = float(w)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise bad(f" (entry {i}: 'weight' must be a number > 0)")
        e["weight"] = float(w)
        if e["format"] not in (None, "jsonl", "parquet"):
            raise bad(f" (entry {i}: 'format' must be jsonl, parquet or null)")
        out.append(e)
    return out


def _range(spec: dict, v: float, bad):
    if spec["choices"] and v not in spec["choices"]:
        raise bad()
    lo, hi = spec["min"], spec["max"]
    if lo is not None and (v < lo or (spec["min_open"] and v == lo)):
        raise bad()
    if hi is not None and (v > hi or (spec["max_open"] and v == hi)):
        raise bad()


def resolve_dtype(requested: str, checkpoint: str | None, slow: tuple[str, ...] = ()) -> tuple[str, str]:
    """(dtype to load the base in, why) for key `dtype` = `requested`: an explicit dtype as it is; "auto": the
    checkpoint's storage dtype (`checkpoint`, None when its config names none: float32), or float32 when the
    backend is slow in that dtype (`slow`, e.g. bf16 on MLX's CPU)."""
    if requested != "auto":
        return requested, "as configured (dtype)"
    if checkpoint is None:
        return "float32", "auto: the checkpoint's config names no dtype"
    if checkpoint in slow:
        return "float32", f"auto: the checkpoint is {checkpoint}, but this backend and device are slow in it"
    return checkpoint, f"auto: the checkpoint's dtype"


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Dataclass defaults <- YAML file `path` <- `overrides` (None values are ignored)."""
    import yaml

    data = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist" if not p.exists() else f"config {p} is not a file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p} is not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read config {p}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of config keys at the top level")
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged = {**data, **flags}
    return TrainConfig.from_dict(merged, str(path or "config"))


def resume_differences(saved: TrainConfig, asked: TrainConfig) -> tuple[dict, dict]:
    """({fixed key: (saved, asked)}, {free key: (saved, asked)}) of the keys that differ."""
    fixed, free = {}, {}
    for name, spec in specs_by_name().items():
        a, b = getattr(saved, name), getattr(asked, name)
        if a != b and spec["resume"] != "fingerprint":
            (free if spec["resume"] == "free" else fixed)[name] = (a, b)
    return fixed, free


def config_from_dict(data: dict | None, source: str = "config") -> TrainConfig:
    """A validated `TrainConfig` from a mapping (YAML); an unknown key is an error that names it."""
    return TrainConfig.from_dict(data, source)


def write_run_config(run_dir: Path, cfg: TrainConfig):
    """The resolved config, as YAML, atomically (what `--resume` reads back)."""
    import yaml

    from .io import write_text

    write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
