"""The training loop: LoRA / QLoRA / full fine-tuning on packed rows, with exact resume.

Notable:
- The loss of an optimizer step is the sum of token losses over the *global* batch (every accumulation
  micro-step, every data-parallel rank) divided by that batch's number of loss tokens, which every rank
  counts from the (shared) data before the step. Accumulation and data parallelism change only speed.
- Labels: position t predicts token t+1 of the same segment (`packing.next_token_targets`), weighted by
  `loss_mask[t+1]`; padding and document boundaries carry no loss.
- AdamW *with* bias correction (`mlx.optimizers.AdamW` defaults to none): the PyTorch/HF behaviour, so the
  published LoRA learning rates this project compares against mean the same thing here. Without it the
  first updates are ~3x larger (m/sqrt(v) = 0.1 / sqrt(0.001) at step 1).
- LoRA parameters, gradients and optimizer state are fp32 whatever the base dtype. `--fine-tune full`
  loads the model in fp32 (master weights) and trains every parameter.
- Exact resume: a checkpoint holds the trainable weights, the optimizer state (safetensors), the step
  and the data position. Nothing random is stateful: the data order of epoch e is a permutation seeded
  by (seed, e), and dropout's key is re-seeded from (seed, step, micro-step, rank) before every
  micro-step, so step s computes the same thing whether or not the run stopped before it.
- Ctrl-C (SIGINT) finishes the current optimizer step, writes a checkpoint and ends with reason
  "interrupted"; a NaN/inf loss ends with reason "nan" before the bad update is applied, keeping the
  last good checkpoint.

Events (plain dicts, to callbacks and to `metrics.jsonl`): "start", "train", "eval", "checkpoint", "end";
their keys are the shared interface documented in the project's trainer contract.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from . import checkpoints
from .io import save_safetensors, write_json, write_text
from .lora import adapter_config, adapter_weights, apply_lora, save_adapters
from .packing import next_token_targets
from .schedule import warmup_cosine


# ---- configuration -------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every training setting and its default (the one place defaults live; YAML and flags override)."""

    # model
    model: str = ""  # directory, Hub id, or "tiny:<preset>" for a random model built on the fly (tiny.py)
    backend: str = "auto"  # auto | mlx | torch (torch_backend.pick_backend says what auto picks where)
    quantize: int | None = None  # 4 or 8: quantize the base at load (QLoRA)
    quantize_group_size: int = 64
    dtype: str = "float32"  # base weights; adapters and optimizer state are fp32 regardless
    # data
    data: str = ""
    seq_len: int = 2048
    packing: str = "swa"  # swa | naive | none (see packing.py)
    overlap: int = 0  # tokens shared by consecutive chunks of a split document
    # what to train
    fine_tune: str = "lora"  # lora | full
    targets: list[str] | str = "all-linear"
    num_layers: int = -1  # adapt the last N layers; -1 = all
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    rank_policy: str = "uniform"  # uniform | gqa (k/v rank r * n_kv / n_heads, alpha/r kept)
    rank_floor: int = 4
    rank_pattern: dict = field(default_factory=dict)  # PEFT-style per-module overrides
    alpha_pattern: dict = field(default_factory=dict)
    # optimisation
    steps: int = 1000
    batch_size: int = 4  # rows per micro-step per rank
    grad_accum: int = 1
    # Peak LR 1.4e-4: 30% below the usual Llama-2 LoRA recipe's 2e-4. A published claim for the Mistral
    # family that we adopt as a hypothesis (the thesis experiment tests it), not a measured optimum.
    lr: float = 1.4e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    bias_correction: bool = True
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    grad_checkpoint: bool = False
    compile: bool = True
    seed: int = 0
    # evaluation and saving
    val_fraction: float = 0.05  # used when the data has no validation split
    eval_every: int = 100
    eval_rows: int = 256  # validation rows per evaluation (fixed, the first ones); 0 = all
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    out: str = "runs/latest"

    def validate(self):
        """Raise ValueError naming the first bad key."""
        checks = [
            ("backend", self.backend in ("auto", "mlx", "torch"), "auto, mlx or torch"),
            ("fine_tune", self.fine_tune in ("lora", "full"), "lora or full"),
            ("packing", self.packing in ("swa", "naive", "none"), "swa, naive or none"),
            ("rank_policy", self.rank_policy in ("uniform", "gqa"), "uniform or gqa"),
            ("quantize", self.quantize in (None, 4, 8), "4, 8 or null"),
            ("seq_len", self.seq_len >= 2, ">= 2"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("steps", self.steps >= 1, ">= 1"),
            ("lora_rank", self.lora_rank >= 1, ">= 1"),
            ("lr", self.lr >= 0, ">= 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ValueError(f"config key {key!r} = {getattr(self, key)!r}: must be {what}")
        if self.fine_tune == "full" and self.quantize:
            raise ValueError("config keys 'fine_tune: full' and 'quantize' conflict: full fine-tuning keeps "
                             "fp32 master weights; drop 'quantize' or use 'fine_tune: lora'")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_from_dict(data: dict | None, source: str = "config") -> TrainConfig:
    """A `TrainConfig` from a dict (YAML); an unknown key is an error that names it."""
    data = dict(data or {})
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                         f"{', '.join(known)}")
    return TrainConfig(**data).validate()


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Dataclass defaults <- YAML file `path` <- `overrides` (None values are ignored)."""
    import yaml

    data = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of config keys at the top level")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(data, str(path or "config"))


# ---- data order: pure functions of (seed, step) -----------------------------------------------------------
def epoch_order(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    """The row order of one epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batch_rows(seed: int, step: int, global_batch: int, n_rows: int) -> np.ndarray:
    """Row indices of optimizer step `step`'s global batch: the next `global_batch` rows of the epoch
    stream (batches run on across epoch boundaries)."""
    start = step * global_batch
    idx = np.arange(start, start + global_batch)
    out = np.empty(global_batch, np.int64)
    for e in np.unique(idx // n_rows):
        sel = idx // n_rows == e
        out[sel] = epoch_order(seed, int(e), n_rows)[idx[sel] % n_rows]
    return out


def micro_rows(rows: np.ndarray, micro: int, rank: int, world: int, batch_size: int) -> np.ndarray:
    """The rows rank `rank` trains on in accumulation micro-step `micro` of a global batch."""
    start = (micro * world + rank) * batch_size
    return rows[start:start + batch_size]


def eval_shard(n_val: int, eval_rows: int, rank: int, world: int) -> np.ndarray:
    """The validation rows rank `rank` evaluates: the first `eval_rows` (0 = all), dealt round-robin."""
    n = n_val if not eval_rows else min(n_val, eval_rows)
    return np.arange(n)[rank::world]


def dropout_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The random seed of one micro-step: a function of where it is, never of what ran before."""
    return int(np.random.default_rng([seed, step, micro, rank]).integers(0, 2**62))


# ---- rows ---------------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """Packed training rows with their next-token targets: numpy arrays (rows, seq_len)."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    weights: np.ndarray  # 1 where position t's prediction of targets[t] counts

    @classmethod
    def from_packed(cls, packed) -> "Rows":
        targets, weights = next_token_targets(packed.tokens, packed.segment_ids, packed.loss_mask)
        return cls(packed.tokens, packed.segment_ids, packed.positions, targets, weights)

    def __len__(self):
        return self.tokens.shape[0]

    def take(self, idx) -> tuple:
        return tuple(mx.array(a[idx]) for a in (self.tokens, self.segment_ids, self.positions, self.targets,
                                                self.weights))

    @property
    def efficiency(self) -> float:
        return float((self.segment_ids > 0).mean()) if self.tokens.size else 0.0


def row_losses(model, tokens, segment_ids, positions, targets, weights):
    """(per-row sums of weighted token losses (B,), number of loss tokens) of one batch, fp32."""
    logits = model(tokens, segment_ids=segment_ids, positions=positions)  # (B, L, vocab)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")  # (B, L)
    w = weights.astype(mx.float32)
    return (ce * w).sum(axis=1), w.sum()


def token_losses(model, tokens, segment_ids, positions, targets, weights):
    """(sum of weighted token losses, number of loss tokens) of one batch, fp32."""
    rows, n = row_losses(model, tokens, segment_ids, positions, targets, weights)
    return rows.sum(), n


def dataset_loss(model, rows: "Rows", batch_size: int = 4) -> tuple[float, int]:
    """(mean token loss, number of loss tokens) of `model` over all `rows`, fp32, in batches."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, n = token_losses(model, *rows.take(range(i, min(i + batch_size, len(rows)))))
        mx.eval(s, n)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1), count


def memory_total() -> int:
    """Bytes of RAM (unified memory on a Mac) of this machine."""
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        if info.get("memory_size"):
            return int(info["memory_size"])
    except Exception:  # CPU builds have no device info: fall back to the OS
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def trainable_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def total_count(model) -> int:
    """Parameters of the model, counting quantized weights at their unpacked size."""
    n = 0
    for name, v in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")) and v.dtype != mx.uint32:
            continue
        n += v.size * (32 // _bits_of(model, name)) if v.dtype == mx.uint32 else v.size
    return n


def _bits_of(model, name: str) -> int:
    m = model
    for part in name.split(".")[:-1]:
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m.bits


# ---- the trainer --------------------------------------------------------------------------------------------
class TrainLoop:
    """What both trainers share: the step loop, its events, checkpoints, SIGINT and NaN handling, resume.

    A backend subclass provides `train_step(step) -> (loss, update, loss tokens)` where `update(lr)`
    applies the accumulated gradient and returns the global gradient norm; `evaluate()`;
    `_write_tensors(dir)` and `load_checkpoint()`; `_save_adapters()` and `_save_model_weights(path)`;
    `_counts()` (trainable, total); `_memory()` (peak, active bytes); `_memory_total()`;
    `_device_name()`; and may override `_reset_peak()`.
    """

    backend = ""

    def stop(self):
        """Ask the run to stop (with a checkpoint) at the next optimizer-step boundary."""
        self._stop = True

    def _emit(self, event: dict):
        event = {"event": event.pop("event"), "time": time.time(), **event}
        for cb in self.callbacks:
            cb(event)

    def _reset_peak(self):
        pass

    def save_checkpoint(self, step: int, extra: dict) -> Path:
        """checkpoints/step-NNNNNNN/{weights,optimizer}.safetensors + state.json, written to a temp
        directory and renamed into place (see checkpoints.py); then the run's current result."""
        state = {"step": step, "data_position": step * self.global_batch, "seed": self.cfg.seed,
                 "global_batch": self.global_batch, "backend": self.backend,
                 "rng": "stateless: data order from (seed, epoch), dropout from (seed, step, micro, rank)",
                 **extra}
        final = checkpoints.write(self.run_dir, step, state, self._write_tensors, self.cfg.keep_checkpoints)
        self.save_outputs()
        return final

    def save_outputs(self):
        """The run's current result: adapters (+ config) for LoRA, a full model directory otherwise
        (the same files on both backends; the caller copies the tokenizer)."""
        if self.lora_config is not None:
            self._save_adapters()
        elif self.save_full is not None:
            self.save_full(self.run_dir)
        else:
            self._save_model_weights(self.run_dir / "model.safetensors")
            write_json(self.run_dir / "config.json", self.model.args.to_hf_config())

    def run(self, resume: bool = False) -> dict:
        """Train to `cfg.steps` (from the latest checkpoint when `resume`); returns the "end" event."""
        start_step, tokens, elapsed0, best_val = 0, 0, 0.0, None
        if resume:
            state = self.load_checkpoint()
            if state is None:
                raise ValueError(f"--resume: {self.run_dir}/checkpoints has no complete checkpoint")
            start_step, tokens = state["step"], state["tokens"]
            elapsed0, best_val = state["elapsed"], state["best_val_loss"]
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            return self._loop(start_step, tokens, elapsed0, best_val)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)

    def _on_sigint(self, signum, frame):
        if self._stop:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        self._stop = True

    def _loop(self, start_step, tokens, elapsed0, best_val) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter() - elapsed0
        self._reset_peak()
        trainable, total = self._counts()
        self._emit({"event": "start", "run_dir": str(self.run_dir), "model": self.model_name,
                    "backend": self.backend, "device": self._device_name(), "fine_tune": cfg.fine_tune,
                    "rank_policy": cfg.rank_policy, "trainable_params": trainable, "total_params": total,
                    "total_steps": cfg.steps, "start_step": start_step, "seq_len": cfg.seq_len,
                    "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "packing": cfg.packing,
                    "packing_efficiency": self.train_rows.efficiency, "memory_total": self._memory_total()})
        last_loss, reason, message, last_ckpt = None, "done", "", None
        step = start_step
        t_log, tok_log, step_log = time.perf_counter(), tokens, start_step

        def state_extra():
            return {"tokens": tokens, "elapsed": time.perf_counter() - t0, "best_val_loss": best_val,
                    "last_loss": last_loss}

        while step < cfg.steps:
            lr = warmup_cosine(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            loss_v, update, n_tok = self.train_step(step)
            if not math.isfinite(loss_v):
                reason = "nan"
                ck = last_ckpt or checkpoints.latest(self.run_dir)
                kept = f"the last good checkpoint is {ck}" if ck else "no checkpoint was written before it"
                message = (f"loss is {loss_v} at step {step + 1}; stopped before applying that update, {kept}. "
                           "Lower the learning rate (lr), enable grad_clip, or check the data.")
                break
            norm = update(lr)
            step += 1
            tokens += n_tok
            last_loss = loss_v
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                dt = max(now - t_log, 1e-9)
                peak, active = self._memory()
                self._emit({"event": "train", "step": step, "loss": loss_v, "lr": lr, "grad_norm": norm,
                            "tokens": tokens, "tokens_per_sec": (tokens - tok_log) / dt,
                            "it_per_sec": (step - step_log) / dt, "elapsed": now - t0,
                            "peak_memory": peak, "active_memory": active,
                            "packing_efficiency": self.train_rows.efficiency})
                t_log, tok_log, step_log = now, tokens, step
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                val = self.evaluate()
                if val is not None:
                    best_val = val if best_val is None else min(best_val, val)
                    self._emit({"event": "eval", "step": step, "val_loss": val,
                                "val_ppl": math.exp(min(val, 700.0))})
            if self._stop or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                if self.rank == 0:
                    last_ckpt = self.save_checkpoint(step, state_extra())
                    self._emit({"event": "checkpoint", "step": step, "path": str(last_ckpt)})
            if self._stop and step < cfg.steps:
                reason = "interrupted"
                flag = f" --backend {self.backend}" if self.backend != "mlx" else ""
                message = (f"interrupted after step {step}; checkpoint {last_ckpt}. Resume with: "
                           f"mlx-mistral train{flag} --out {self.run_dir} --resume")
                break
        if reason == "done":
            message = f"trained {step} steps; adapters in {self.run_dir}"
        end = {"event": "end", "step": step, "reason": reason, "elapsed": time.perf_counter() - t0,
               "final_loss": last_loss, "best_val_loss": best_val, "tokens": tokens,
               "peak_memory": self._memory()[0], "run_dir": str(self.run_dir),
               "adapter_path": str(self.run_dir / ("adapters.safetensors" if self.lora_config is not None
                                                   else "model.safetensors")),
               "message": message}
        self._emit(dict(end))
        return end


class Trainer(TrainLoop):
    """Runs `cfg.steps` optimizer steps on `train` rows, writing the run directory (rank 0).

    `model` comes with LoRA already applied (or unfrozen for full fine-tuning); `lora_config` is the
    adapter_config.json dict (None for full fine-tuning, which saves `model.safetensors` instead).
    `group`: an `mx.distributed` group for data parallelism (None: single process).
    """

    backend = "mlx"

    def __init__(self, model, cfg: TrainConfig, train: Rows, val: Rows | None = None, run_dir=None,
                 callbacks=(), lora_config: dict | None = None, model_name: str = "", group=None,
                 save_full=None):
        self.model, self.cfg, self.train_rows, self.val_rows = model, cfg, train, val
        self.run_dir = Path(run_dir or cfg.out)
        self.lora_config = lora_config
        self.model_name = model_name or cfg.model
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.world = group.size() if group is not None else 1
        self.callbacks = list(callbacks) if self.rank == 0 else []
        self.save_full = save_full  # callable(dir) writing a full model (full fine-tuning)
        self._stop = False
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        if len(train) == 0:
            raise ValueError("no training rows: the dataset is empty after packing")
        self.optimizer = optim.AdamW(learning_rate=cfg.lr, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, bias_correction=cfg.bias_correction)
        self.optimizer.init(model.trainable_parameters())
        self._build_steps()

    # -- compiled pieces ------------------------------------------------------------------------------
    def _build_steps(self):
        model, opt, cfg = self.model, self.optimizer, self.cfg
        model.checkpoint_layers = cfg.grad_checkpoint

        def loss_fn(model, tokens, seg, pos, targets, weights, denom):
            rows, _ = row_losses(model, tokens, seg, pos, targets, weights)
            return rows.sum() / denom, rows

        value_grad = nn.value_and_grad(model, loss_fn)

        def micro(tokens, seg, pos, targets, weights, denom):
            (_, rows), grads = value_grad(model, tokens, seg, pos, targets, weights, denom)
            return rows, grads

        def update(grads):
            if cfg.grad_clip > 0:
                grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
            else:
                norm = optim.clip_grad_norm(grads, float("inf"))[1]
            opt.update(model, grads)
            return norm

        def evaluate(tokens, seg, pos, targets, weights):
            return token_losses(model, tokens, seg, pos, targets, weights)

        state = [model.state, opt.state, mx.random.state]
        if cfg.compile:
            micro = mx.compile(micro, inputs=state, outputs=state)
            update = mx.compile(update, inputs=state, outputs=state)
            evaluate = mx.compile(evaluate, inputs=state, outputs=state)
        self._micro, self._update, self._evaluate = micro, update, evaluate

    # -- backend hooks of TrainLoop -----------------------------------------------------------------------
    def _device_name(self) -> str:
        return str(mx.default_device())

    def _counts(self) -> tuple[int, int]:
        return trainable_count(self.model), total_count(self.model)

    def _memory(self) -> tuple[int, int]:
        return mx.get_peak_memory(), mx.get_active_memory()

    def _memory_total(self) -> int:
        return memory_total()

    def _reset_peak(self):
        mx.reset_peak_memory()

    def _all_sum(self, x):
        if self.world == 1:
            return x
        return tree_map(lambda a: mx.distributed.all_sum(a, group=self.group), x)

    # -- one optimizer step -------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, "Callable[[float], float]", int]:
        """Accumulate the gradient of the global batch of `step`; returns (loss, update, loss tokens).
        The caller applies `update(lr)` after checking the loss.

        The reported loss adds the per-row loss sums of the whole global batch in float64, in global row
        order, so it does not depend on how rows were split across micro-steps and ranks."""
        cfg = self.cfg
        rows = batch_rows(cfg.seed, step, self.global_batch, len(self.train_rows))
        n_tokens = int(self.train_rows.weights[rows].sum())
        denom = mx.array(max(n_tokens, 1), mx.float32)
        row_sums, grads = [], None
        self.model.train()
        for m in range(cfg.grad_accum):
            idx = micro_rows(rows, m, self.rank, self.world, cfg.batch_size)
            mx.random.seed(dropout_seed(cfg.seed, step, m, self.rank))
            r, g = self._micro(*self.train_rows.take(idx), denom)
            if self.world > 1:
                r = mx.distributed.all_gather(r, group=self.group)  # rank order == global row order
            row_sums.append(r)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            if cfg.grad_accum > 1:
                mx.eval(r, grads, mx.random.state)  # bound the graph (and memory) to one micro-step
        grads = self._all_sum(grads)
        mx.eval(row_sums)
        total = np.concatenate([np.array(r) for r in row_sums]).astype(np.float64).sum()
        return float(total / max(n_tokens, 1)), partial(self._apply, grads), n_tokens

    def _apply(self, grads, lr: float) -> float:
        """Clip and apply `grads` at learning rate `lr`; returns the global gradient norm."""
        self.optimizer.learning_rate = mx.array(lr, mx.float32)
        norm = self._update(grads)
        mx.eval(norm, self.model.parameters(), self.optimizer.state, mx.random.state)
        return float(norm)

    def evaluate(self) -> float | None:
        """Mean token loss over the validation rows (sharded across ranks)."""
        v = self.val_rows
        if v is None or len(v) == 0:
            return None
        self.model.eval()
        total, count = mx.array(0.0), mx.array(0.0)
        b = self.cfg.batch_size
        mine = eval_shard(len(v), self.cfg.eval_rows, self.rank, self.world)
        for i in range(0, len(mine), b):
            s, c = self._evaluate(*v.take(mine[i:i + b]))
            total, count = total + s, count + c
            mx.eval(total, count)
        total, count = self._all_sum((total, count))
        self.model.train()
        return float(total) / max(float(count), 1.0)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _weights(self) -> dict:
        if self.lora_config is not None:
            return adapter_weights(self.model)
        return dict(tree_flatten(self.model.trainable_parameters()))

    def _write_tensors(self, tmp: Path):
        save_safetensors(tmp / "weights.safetensors", self._weights())
        save_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(self.optimizer.state)))

    def _save_adapters(self):
        save_adapters(self.run_dir, self.model, self.lora_config)

    def _save_model_weights(self, path: Path):
        save_safetensors(path, dict(tree_flatten(self.model.parameters())), metadata={"format": "mlx"})

    def load_checkpoint(self) -> dict | None:
        """Restore the latest complete checkpoint of the run directory; returns its state or None."""
        path = checkpoints.latest(self.run_dir)
        if path is None:
            return None
        state = checkpoints.read_state(path, self.global_batch)
        weights = mx.load(str(path / "weights.safetensors"))
        expected = dict(tree_flatten(self.model.trainable_parameters()))
        if set(weights) != set(expected):
            raise ValueError(f"{path}: weights do not match this model's trainable parameters "
                             f"(e.g. {sorted(set(weights) ^ set(expected))[:3]})")
        self.model.load_weights(list(weights.items()), strict=False)
        saved = mx.load(str(path / "optimizer.safetensors"))
        have = dict(tree_flatten(self.optimizer.state))
        if set(saved) != set(have):
            raise ValueError(f"{path}/optimizer.safetensors does not match this run's optimizer state "
                             f"(e.g. {sorted(set(saved) ^ set(have))[:3]})")
        # leaf by leaf and in place: the compiled step holds this very dict (empty sub-trees included)
        self.optimizer.state.update(tree_map_with_path(lambda k, _: saved[k], self.optimizer.state))
        mx.eval(self.model.parameters(), self.optimizer.state)
        return state

    # -- the loop ---------------------------------------------------------------------------------------------


# ---- putting a run together -----------------------------------------------------------------------------------
def prepare_model(model, cfg: TrainConfig, model_name: str):
    """Quantize (QLoRA), add adapters or unfreeze (full); returns the adapter_config dict or None."""
    from .loader import quantize_model

    if cfg.quantize:
        quantize_model(model, group_size=cfg.quantize_group_size, bits=cfg.quantize)
    if cfg.fine_tune == "full":
        model.unfreeze()
        return None
    specs = apply_lora(model, cfg.targets, cfg.num_layers, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                       cfg.rank_policy, cfg.rank_floor, cfg.rank_pattern or None, cfg.alpha_pattern or None,
                       seed=cfg.seed)
    return adapter_config(specs, base_model=model_name, args=model.args, targets=cfg.targets,
                          num_layers=cfg.num_layers, policy=cfg.rank_policy, rank=cfg.lora_rank,
                          alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


def write_run_config(run_dir: Path, cfg: TrainConfig):
    """The resolved config, as YAML, atomically (what `--resume` reads back)."""
    import yaml

    write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def split_rows(packed, val_fraction: float, seed: int):
    """(train, val) `Rows` from one `Packed`: a fixed, seeded fraction of rows held out."""
    rows = Rows.from_packed(packed)
    n = len(rows)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])

    def sub(idx):
        return Rows(*(a[idx] for a in (rows.tokens, rows.segment_ids, rows.positions, rows.targets, rows.weights)))

    return sub(train_idx), (sub(val_idx) if n_val else None)
