"""The training loop both backends run: LoRA / QLoRA / full fine-tuning on packed rows, with exact resume.

Notable:
- The loss of an optimizer step is the sum of token losses over the *global* batch (every accumulation
  micro-step, every data-parallel rank) divided by that batch's number of loss tokens, which every rank
  counts from the (shared) data before the step. Accumulation and data parallelism change only speed.
- Labels: position t predicts token t+1 of the same segment (`packing.next_token_targets`), weighted by
  `loss_mask[t+1]`; padding and document boundaries carry no loss.
- AdamW *with* bias correction (the PyTorch/HF behaviour; `mlx.optimizers.AdamW` defaults to none), so
  the published LoRA learning rates this project compares against mean the same thing here. Without it
  the first updates are ~3x larger (m/sqrt(v) = 0.1 / sqrt(0.001) at step 1).
- LoRA parameters, gradients and optimizer state are fp32 whatever the base dtype. `--fine-tune full`
  loads the model in fp32 (master weights) and trains every parameter.
- Exact resume: a checkpoint holds the trainable weights, the optimizer state (safetensors), the step
  and the data position. Nothing random is stateful: the data order of epoch e is a permutation seeded
  by (seed, e), and dropout's key is re-seeded from (seed, step, micro-step, rank) before every
  micro-step, so step s computes the same thing whether or not the run stopped before it.
- Ctrl-C (SIGINT) and SIGTERM (schedulers, `docker stop`) finish the current optimizer step, write a
  checkpoint and end with reason "interrupted" (the writes are atomic, so a second signal or a kill
  mid-write loses only that checkpoint).
- A checkpoint counts as good (`checkpoints.mark_verified`) once its weights have produced a finite loss:
  the next step's, or a forward pass over the next batch at the end of the run. A NaN/inf loss ends with
  reason "nan" before the bad update is applied; the unverified checkpoints (the weights that produced
  it) are deleted and the run's outputs restored from the last good one. Gradients exactly zero for
  `STALL_STEPS` steps after warm-up (a collapsed model: its loss sits at ln(vocab)) end with "stalled".

Events (plain dicts, to callbacks and to `metrics.jsonl`): "start", "train", "eval", "checkpoint", "end";
their keys are the shared interface documented in the project's trainer contract.

What is here decides *what* is computed; each backend's `Trainer` (backends/mlx/trainer.py,
backends/torch/trainer.py) subclasses `TrainLoop` with how: the step, the loss sums, tensor files.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import blocks, checkpoints
from . import preference as pref
from .adapters import config_for, fingerprint, plan_for_config
from .io import write_json
from .packing import next_token_targets
from .schedule import warmup_cosine
from .train_config import TrainConfig

#: Optimizer steps after warm-up with a gradient norm of exactly 0 before a run is declared stalled.
STALL_STEPS = 5
#: How a run that ended this way should exit (the CLI's exit status; 0 for "done").
EXIT_CODES = {"done": 0, "nan": 1, "stalled": 1, "interrupted": 130, "terminated": 143}


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

    def take(self, idx) -> tuple[np.ndarray, ...]:
        """(tokens, segment_ids, positions, targets, weights) of rows `idx`; a backend makes tensors of them."""
        return tuple(a[idx] for a in (self.tokens, self.segment_ids, self.positions, self.targets, self.weights))

    @property
    def efficiency(self) -> float:
        return float((self.segment_ids > 0).mean()) if self.tokens.size else 0.0


def mean_token_loss(rows: Rows, batch_size: int, batch_sums: Callable) -> tuple[float, int]:
    """(mean token loss, number of loss tokens) over all `rows`, batch by batch: `batch_sums(idx)` gives
    (sum of weighted token losses, loss tokens) of rows `idx` (a backend's forward pass)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, n = batch_sums(np.arange(i, min(i + batch_size, len(rows))))
        total, count = total + s, count + n
    return total / max(count, 1), count


def gather_pairs(objective: str, per_pair: list[dict], pair_ids: list[np.ndarray]) -> dict:
    """Per-pair values of several micro-batches (each with padded pair slots) as one float64 array per key,
    the real pairs only, in micro-batch order (global pair order within each)."""
    return {k: np.concatenate([np.asarray(d[k], np.float64)[:len(p)] for d, p in zip(per_pair, pair_ids)])
            for k in pref.PAIR_KEYS[objective]}


# ---- the loop ---------------------------------------------------------------------------------------------
class TrainLoop:
    """What both trainers share: the constructor, the step loop, its events, evaluation, checkpoints,
    SIGINT and NaN handling, resume.

    `model` comes with LoRA already applied (or unfrozen for full fine-tuning); `lora_config` is the
    adapter_config.json dict (None for full fine-tuning, which saves `model.safetensors` instead, or
    calls `save_full(run_dir)`); `rank`/`world` place this process in data parallelism.

    For DPO / ORPO (`cfg.objective`), `train` and `val` are `core.pairs.PairRows`; the backend's
    `train_step` then takes its micro-batches from `_pref_step_plan` and reports through `_pref_finish`,
    and `_pair_values(rows, batches)` gives the per-pair values of an evaluation.

    A backend subclass provides `train_step(step) -> (loss, update, loss tokens)` where `update(lr)`
    applies the accumulated gradient and returns the global gradient norm; `_loss_sums(rows, batches)`
    (summed over ranks); `_write_tensors(dir)` and `_restore(checkpoint_dir)`; `_save_adapters()` and
    `_save_model_weights(path)`; `_counts()` (trainable, total); `_memory()` (peak, active bytes);
    `_memory_total()`; `_device_name()`; and may override `_reset_peak()`.
    """

    backend = ""
    start_info: dict = {}  # more keys of the "start" event, set by the recipe (dtype and why, context_stats)

    def __init__(self, model, cfg: TrainConfig, train: Rows, val: Rows | None = None, run_dir=None,
                 callbacks=(), lora_config: dict | None = None, model_name: str = "", save_full=None, *,
                 rank: int = 0, world: int = 1):
        self.model, self.cfg, self.train_rows, self.val_rows = model, cfg, train, val
        self.run_dir = Path(run_dir or cfg.out)
        self.lora_config = lora_config
        self.model_name = model_name or cfg.model
        self.rank, self.world = rank, world
        self.callbacks = list(callbacks) if rank == 0 else []
        self.save_full = save_full  # callable(dir) writing a full model (full fine-tuning)
        self.resume_changes: dict = {}  # free keys changed by --resume {key: [saved, now]} (recipes/finetune.py)
        self._stop = False
        self._signal = None
        self.global_batch = cfg.batch_size * cfg.grad_accum * world
        if len(train) == 0:
            raise ValueError("no training rows: the dataset is empty after packing")
        self.step_metrics, self.eval_metrics = {}, {}
        self._check_preference()

    def evaluate(self) -> float | None:
        """Mean token loss over the validation rows (the first `eval_rows`, sharded across ranks); for
        DPO / ORPO the preference loss over the validation pairs, with their reward metrics in
        `self.eval_metrics`."""
        v = self.val_rows
        if v is None or len(v) == 0:
            return None
        b = self.cfg.batch_size
        mine = eval_shard(len(v), self.cfg.eval_rows, self.rank, self.world)
        batches = [mine[i:i + b] for i in range(0, len(mine), b)]
        self.model.eval()
        try:
            if self.cfg.objective != "sft":
                loss, metrics = pref.step_metrics(self.cfg.objective, self._pair_values(v, batches))
                self.eval_metrics = {f"val_{k}": x for k, x in metrics.items()}
                return loss
            total, count = self._loss_sums(v, batches)
        finally:
            self.model.train()
        return total / max(count, 1.0)

    # -- preference tuning (DPO / ORPO): what a backend's step needs, from the data ---------------------
    def _check_preference(self):
        cfg = self.cfg
        if cfg.objective == "sft":
            return
        pref.check_options(cfg.beta, cfg.dpo_loss, cfg.label_smoothing)
        if self.world > 1:
            raise ValueError(f"fine_tune: {cfg.fine_tune} runs in one process for now (data parallelism is "
                             "SFT only); launch it without mlx.launch / torchrun")
        if not hasattr(self.train_rows, "pair_row"):
            raise ValueError(f"fine_tune: {cfg.fine_tune} trains on preference pairs (core.pairs.PairRows)")
        needs_table = cfg.objective == "dpo" and self.lora_config is None
        for rows in (self.train_rows, self.val_rows):
            if needs_table and rows is not None and rows.reference is None:
                raise ValueError("full-parameter DPO needs the reference log-probs precomputed (PairRows.reference)")
        self.pair_slots = cfg.batch_size * max(r.max_pairs_per_row for r in (self.train_rows, self.val_rows)
                                               if r is not None and len(r))

    def _pair_micro_batches(self, rows, idx_list) -> list[tuple]:
        """For each row index set: `(arrays, pair_ids, valid, ref)`: `arrays` is `PairRows.take` with
        `pair_slots` pair slots (tokens, seg, pos, targets, weights, full_weights, local), `valid` (S,) float32,
        `ref` (2S,) float32 precomputed reference log-probs or None (reference evaluated in the step)."""
        out = []
        for idx in idx_list:
            *arrays, pair_ids = rows.take(idx, self.pair_slots)
            valid = np.zeros(self.pair_slots, np.float32)
            valid[:len(pair_ids)] = 1
            ref = rows.subset_reference(pair_ids, self.pair_slots) if rows.reference is not None else None
            out.append((tuple(arrays), pair_ids, valid, ref))
        return out

    def _pref_step_plan(self, step: int):
        """(micro-batches of this rank, global pair count, ORPO's global chosen-target count, real tokens)."""
        cfg = self.cfg
        rows = batch_rows(cfg.seed, step, self.global_batch, len(self.train_rows))
        idx = [micro_rows(rows, m, self.rank, self.world, cfg.batch_size) for m in range(cfg.grad_accum)]
        n_pairs = self.train_rows.pair_count(rows)
        return (self._pair_micro_batches(self.train_rows, idx), max(n_pairs, 1),
                max(self.train_rows.chosen_targets(rows), 1), self.train_rows.real_tokens(rows))

    def _pref_finish(self, per_pair: list[dict], pair_ids: list[np.ndarray]) -> float:
        """The step's loss from the per-pair values of its micro-steps (numpy, sliced to their real pairs);
        its metrics go to `self.step_metrics` (averaged over the steps of a log interval)."""
        loss, self.step_metrics = pref.step_metrics(self.cfg.objective,
                                                    gather_pairs(self.cfg.objective, per_pair, pair_ids))
        return loss

    def load_checkpoint(self, path: Path | None = None) -> dict | None:
        """Restore checkpoint `path` (default: the latest complete one); returns its state or None. A
        checkpoint of another model, shape or batch, or a damaged one, is a ValueError naming it."""
        path = path or checkpoints.latest(self.run_dir)
        if path is None:
            return None
        state = checkpoints.read_state(path, self.global_batch)
        saved_fp, fp = state.get("fingerprint"), fingerprint(self.model.args)
        if saved_fp is not None and saved_fp != fp:
            raise ValueError(f"{path} was trained on another model (architecture fingerprint {saved_fp}, this "
                             f"model's is {fp}); resume with the run's own model")
        try:
            self._restore(path)
        except ValueError:
            raise
        except Exception as e:  # safetensors / MLX / torch errors of a damaged file
            raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged: delete "
                             f"it to resume from the one before it") from None
        return state

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
                 "fingerprint": fingerprint(self.model.args),
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
            path = checkpoints.latest(self.run_dir)
            if path is None:
                raise ValueError(f"--resume: {self.run_dir}/checkpoints has no complete checkpoint")
            state = dict(self.load_checkpoint(path), path=path)
            start_step, tokens = state["step"], state["tokens"]
            elapsed0, best_val = state["elapsed"], state["best_val_loss"]
            self._emit({"event": "resume", "step": start_step, "checkpoint": str(state["path"]),
                        "changed": self.resume_changes})
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop(start_step, tokens, elapsed0, best_val)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def _verify(self, step: int):
        """The weights of checkpoint `step` (if one was written) just produced a finite loss: mark it good."""
        if self.rank == 0:
            path = self.run_dir / "checkpoints" / f"step-{step:07d}"
            if (path / "state.json").exists() and not checkpoints.is_verified(path):
                checkpoints.mark_verified(path)

    def _final_loss(self, step: int) -> float:
        """The loss of the final weights on the next step's first micro-batch (a forward pass only; DPO /
        ORPO: the preference loss of its pairs), which verifies the final checkpoint."""
        rows = micro_rows(batch_rows(self.cfg.seed, step, self.global_batch, len(self.train_rows)), 0,
                          self.rank, self.world, self.cfg.batch_size)
        self.model.eval()
        try:
            if self.cfg.objective != "sft":  # DPO / ORPO: the preference loss of those rows' pairs
                loss = pref.step_metrics(self.cfg.objective, self._pair_values(self.train_rows, [rows]))[0]
            else:
                total, count = self._loss_sums(self.train_rows, [rows])
                loss = total / max(count, 1.0)
        finally:
            self.model.train()
        if math.isfinite(loss):
            self._verify(step)
        return loss

    def _diverged(self, what: str) -> str:
        """After a non-finite loss: delete the checkpoints whose weights were never shown to give a finite
        loss, restore the last good one's weights and outputs; the end message."""
        good = checkpoints.latest_verified(self.run_dir)
        dropped = checkpoints.drop_unverified(self.run_dir) if self.rank == 0 else []
        if good is not None:
            self._restore(good)
            if self.rank == 0:
                self.save_outputs()
        kept = (f"the last good checkpoint is {good} (the run's adapters were restored from it)" if good else
                "no checkpoint had produced a finite loss")
        gone = f"; deleted {', '.join(p.name for p in dropped)}, whose weights diverged" if dropped else ""
        return (f"{what}; stopped before applying that update, {kept}{gone}. "
                "Lower the learning rate (lr), enable grad_clip, or check the data.")

    def _on_signal(self, signum, frame):
        if self._stop:  # a second Ctrl-C / SIGTERM: stop now, without the checkpoint
            raise KeyboardInterrupt
        self._stop = True
        self._signal = signum

    def _attention_info(self) -> dict:
        """The start event's attention path (attention, attention_block, attention_reason): the rows' plan
        (core/blocks.py); a backend with more paths of its own says which it takes."""
        cfg = self.cfg
        return blocks.describe(cfg.seq_len, self.model.args.sliding_window, cfg.attention, cfg.attention_block)

    def _loop(self, start_step, tokens, elapsed0, best_val) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter() - elapsed0
        self._reset_peak()
        self.step_metrics, self.eval_metrics = {}, {}
        logged: dict[str, list[float]] = {}
        trainable, total = self._counts()
        self._emit({"event": "start", "run_dir": str(self.run_dir), "model": self.model_name,
                    "backend": self.backend, "device": self._device_name(), "fine_tune": cfg.fine_tune,
                    "objective": cfg.objective, "rank_policy": cfg.rank_policy, "trainable_params": trainable,
                    "total_params": total,
                    "total_steps": cfg.steps, "start_step": start_step, "seq_len": cfg.seq_len,
                    "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "packing": cfg.packing,
                    "packing_efficiency": self.train_rows.efficiency, "memory_total": self._memory_total(),
                    **self._attention_info(), **self.start_info})
        last_loss, reason, message, last_ckpt = None, "done", "", None
        step = start_step
        t_log, tok_log, step_log = time.perf_counter(), tokens, start_step

        def state_extra():
            return {"tokens": tokens, "elapsed": time.perf_counter() - t0, "best_val_loss": best_val,
                    "last_loss": last_loss}

        zero_grads = 0  # consecutive steps after warm-up whose gradient norm was exactly 0
        while step < cfg.steps:
            lr = warmup_cosine(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            loss_v, update, n_tok = self.train_step(step)
            if not math.isfinite(loss_v):
                reason, message = "nan", self._diverged(f"loss is {loss_v} at step {step + 1}")
                break
            self._verify(step)
            norm = update(lr)
            step += 1
            tokens += n_tok
            last_loss = loss_v
            for k, v in self.step_metrics.items():
                logged.setdefault(k, []).append(v)
            zero_grads = zero_grads + 1 if step > cfg.warmup_steps and norm == 0.0 else 0
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                dt = max(now - t_log, 1e-9)
                peak, active = self._memory()
                self._emit({"event": "train", "step": step, "loss": loss_v, "lr": lr, "grad_norm": norm,
                            "tokens": tokens, "tokens_per_sec": (tokens - tok_log) / dt,
                            "it_per_sec": (step - step_log) / dt, "elapsed": now - t0,
                            "peak_memory": peak, "active_memory": active,
                            "packing_efficiency": self.train_rows.efficiency,
                            **{k: float(np.mean(v)) for k, v in logged.items()}})
                t_log, tok_log, step_log = now, tokens, step
                logged = {}
            if zero_grads >= STALL_STEPS:
                ln_v = math.log(self.model.args.vocab_size)
                reason = "stalled"
                message = (f"the gradients have been exactly 0 for {zero_grads} steps (steps {step - zero_grads + 1}-"
                           f"{step}) at loss {loss_v:.4f} (ln(vocab) = {ln_v:.4f}): the model has collapsed and "
                           f"cannot learn any more. Lower the learning rate (lr = {cfg.lr:g}) and start again; "
                           f"checkpoints written after step {step - zero_grads} hold the collapsed model.")
                break
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                val = self.evaluate()
                if val is not None:
                    best_val = val if best_val is None else min(best_val, val)
                    ppl = {"val_ppl": math.exp(min(val, 700.0))} if cfg.objective == "sft" else {}
                    self._emit({"event": "eval", "step": step, "val_loss": val, **ppl, **self.eval_metrics})
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
        if reason == "done":  # the final checkpoint (always written) is verified by one more forward pass
            final = self._final_loss(step)
            if not math.isfinite(final):
                reason, message = "nan", self._diverged(f"the final weights give a loss of {final}")
        if reason == "done":
            message = f"trained {step} steps; adapters in {self.run_dir}"
        elif reason == "interrupted" and self._signal == signal.SIGTERM:
            reason = "terminated"
            message = message.replace("interrupted", "terminated (SIGTERM)", 1)
        end = {"event": "end", "step": step, "reason": reason, "elapsed": time.perf_counter() - t0,
               "final_loss": last_loss, "best_val_loss": best_val, "tokens": tokens,
               "peak_memory": self._memory()[0], "run_dir": str(self.run_dir),
               "adapter_path": str(self.run_dir / ("adapters.safetensors" if self.lora_config is not None
                                                   else "model.safetensors")),
               "message": message}
        self._emit(dict(end))
        return end


# ---- putting a run together -----------------------------------------------------------------------------------
def prepare_model(model, cfg: TrainConfig, model_name: str, *, quantize: Callable, unfreeze: Callable,
                  apply_specs: Callable) -> dict | None:
    """Quantize (QLoRA), add adapters or unfreeze (full fine-tuning), with a backend's operations
    `quantize(model, cfg)`, `unfreeze(model)` and `apply_specs(model, specs, dropout, seed)`; returns the
    adapter_config dict, or None for full fine-tuning."""
    if cfg.quantize:
        quantize(model, cfg)
    if cfg.trains_full:
        unfreeze(model)
        return None
    specs = plan_for_config(model.args, cfg)
    apply_specs(model, specs, cfg.lora_dropout, cfg.seed)
    return config_for(specs, cfg, model_name, model.args)


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
