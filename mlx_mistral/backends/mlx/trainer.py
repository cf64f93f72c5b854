"""The training step on MLX: the `core.loop.TrainLoop` hooks, compiled.

`Trainer` adds to the shared loop only how a step is computed here: the loss and its gradient under
`mx.compile`, gradient accumulation with a bounded graph, clipping, MLX's AdamW (with bias correction),
`mx.distributed` all-sums across data-parallel ranks, and the tensor files of a checkpoint.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ...core import blocks as block_plan, loop
from ...core.checkpoints import check_names
from ...core.loop import Rows, TrainLoop, batch_rows, dropout_seed, micro_rows
from ...core.train_config import TrainConfig
from .loader import load_safetensors, quantize_model, save_safetensors
from . import blockwise, preference
from .model import LOSS_CHUNK
from .lora import adapter_weights, apply_specs, save_adapters


def _mx(arrays) -> tuple:
    """MLX arrays of a `Rows.take` tuple (arrays already in MLX pass through, also under `mx.compile`)."""
    return tuple(a if isinstance(a, mx.array) else mx.array(a) for a in arrays)


def row_losses(model, tokens, segment_ids, positions, targets, weights):
    """(per-row sums of weighted token losses (B,), number of loss tokens) of one batch, fp32."""
    tokens, segment_ids, positions, targets, weights = _mx((tokens, segment_ids, positions, targets, weights))
    w = weights.astype(mx.float32)
    if model.block_size(tokens.shape[1]) is not None:  # long rows: the head and the loss a chunk at a time
        h = model.hidden_states(tokens, segment_ids=segment_ids, positions=positions)  # (B, L, hidden)

        def head(params, hc):
            model.update(params)
            return model.logits(hc)

        chunk = LOSS_CHUNK or block_plan.loss_chunk(model.args.vocab_size)
        return blockwise.chunked_loss(head, model.head_parameters(), h, targets, weights, chunk), w.sum()
    logits = model(tokens, segment_ids=segment_ids, positions=positions)  # (B, L, vocab)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")  # (B, L)
    return (ce * w).sum(axis=1), w.sum()


def token_losses(model, tokens, segment_ids, positions, targets, weights):
    """(sum of weighted token losses, number of loss tokens) of one batch, fp32."""
    rows, n = row_losses(model, tokens, segment_ids, positions, targets, weights)
    return rows.sum(), n


def dataset_loss(model, rows: Rows, batch_size: int = 4) -> tuple[float, int]:
    """(mean token loss, number of loss tokens) of `model` over all `rows`, fp32, in batches."""
    def sums(idx):
        s, n = token_losses(model, *rows.take(idx))
        mx.eval(s, n)
        return float(s), int(n)

    return loop.mean_token_loss(rows, batch_size, sums)


def device_name(device=None) -> str:
    """The default (or given) MLX device, readably: "cpu (AMD EPYC 7B13, 16 cores)", "gpu (Apple M2 Pro)"."""
    from ...core.device import describe

    device = device if device is not None else mx.default_device()
    kind = "cpu" if device.type == mx.cpu else "gpu"
    try:
        name = mx.device_info(device).get("device_name") if hasattr(mx, "device_info") else None
    except Exception:  # a build without device info
        name = None
    return describe(kind, None if kind == "cpu" else name)


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


class Trainer(TrainLoop):
    """Runs `cfg.steps` optimizer steps on `train` rows, writing the run directory (rank 0); see
    `core.loop.TrainLoop` for the arguments. `group`: an `mx.distributed` group for data parallelism
    (None: single process).
    """

    backend = "mlx"

    def __init__(self, model, cfg: TrainConfig, train: Rows, val: Rows | None = None, run_dir=None,
                 callbacks=(), lora_config: dict | None = None, model_name: str = "", group=None,
                 save_full=None):
        super().__init__(model, cfg, train, val, run_dir, callbacks, lora_config, model_name, save_full,
                         rank=group.rank() if group is not None else 0,
                         world=group.size() if group is not None else 1)
        self.group = group
        self.optimizer = optim.AdamW(learning_rate=cfg.lr, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, bias_correction=cfg.bias_correction)
        self.optimizer.init(model.trainable_parameters())
        self._build_steps()

    # -- compiled pieces ------------------------------------------------------------------------------
    def _build_steps(self):
        model, opt, cfg = self.model, self.optimizer, self.cfg
        model.checkpoint_layers = cfg.grad_checkpoint
        model.attention, model.attention_block = cfg.attention, cfg.attention_block
        model.chunk_layers = cfg.lora_dropout == 0  # dropout draws its masks per shape: chunks would differ

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
        if cfg.objective != "sft":
            self._build_preference_steps(state)

    def _build_preference_steps(self, state):
        """DPO / ORPO: the policy pass with its gradient, its value alone (evaluation) and the reference pass
        (adapters off), each compiled on its own: the adapter switch is read while tracing."""
        model, cfg, slots = self.model, self.cfg, self.pair_slots
        fn = preference.micro_fn(cfg, slots)
        value_grad = nn.value_and_grad(model, fn)

        def pref_micro(*batch):
            (_, per_pair), grads = value_grad(model, *batch)
            return per_pair, grads

        def pref_value(*batch):
            return fn(model, *batch)[1]

        def ref(tokens, seg, pos, targets, weights, local):
            return preference.reference_logps(model, tokens, seg, pos, targets, weights, local, 2 * slots)

        if cfg.compile:
            pref_micro = mx.compile(pref_micro, inputs=state, outputs=state)
            pref_value = mx.compile(pref_value, inputs=state, outputs=state)
            ref = mx.compile(ref, inputs=state, outputs=state)
        self._pref_micro, self._pref_value, self._ref = pref_micro, pref_value, ref

    def _pref_batch(self, arrays, valid, ref, n_pairs: int, nll_tokens: int) -> tuple:
        """The MLX inputs of a preference micro-step; the reference evaluated now when not precomputed."""
        tokens, seg, pos, targets, weights, full, local = _mx(arrays)
        if ref is None:
            ref = self._ref(tokens, seg, pos, targets, weights, local) if self.cfg.objective == "dpo" \
                else mx.zeros((2 * self.pair_slots,), mx.float32)
            mx.eval(ref)  # the reference's activations are freed before the policy pass
        return (tokens, seg, pos, targets, weights, full, local, mx.array(ref), mx.array(valid),
                mx.array(float(n_pairs)), mx.array(float(nll_tokens)))

    # -- backend hooks of TrainLoop -----------------------------------------------------------------------
    def _device_name(self) -> str:
        return device_name()

    def _counts(self) -> tuple[int, int]:
        return trainable_count(self.model), total_count(self.model)

    def _memory(self) -> tuple[int, int]:
        return mx.get_peak_memory(), mx.get_active_memory()

    def _memory_total(self) -> int:
        return memory_total()

    def _reset_peak(self):
        mx.reset_peak_memory()

    def _take(self, rows: Rows, idx) -> tuple:
        return _mx(rows.take(idx))

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
        if cfg.objective != "sft":
            return self._preference_step(step)
        rows = batch_rows(cfg.seed, step, self.global_batch, len(self.train_rows))
        n_tokens = int(self.train_rows.weights[rows].sum())
        denom = mx.array(max(n_tokens, 1), mx.float32)
        row_sums, grads = [], None
        self.model.train()
        for m in range(cfg.grad_accum):
            idx = micro_rows(rows, m, self.rank, self.world, cfg.batch_size)
            mx.random.seed(dropout_seed(cfg.seed, step, m, self.rank))
            r, g = self._micro(*self._take(self.train_rows, idx), denom)
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

    def _preference_step(self, step: int):
        """DPO / ORPO: per micro-step the reference pass (adapters off, or the precomputed table), then the
        policy pass with its gradient; the loss and metrics from the per-pair values of the whole batch."""
        micro, n_pairs, nll_tokens, n_tokens = self._pref_step_plan(step)
        per_pair, pair_ids, grads = [], [], None
        self.model.train()
        for m, (arrays, ids, valid, ref) in enumerate(micro):
            mx.random.seed(dropout_seed(self.cfg.seed, step, m, self.rank))
            values, g = self._pref_micro(*self._pref_batch(arrays, valid, ref, n_pairs, nll_tokens))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(values, grads, mx.random.state)  # bound the graph (and memory) to one micro-step
            per_pair.append({k: np.array(v) for k, v in values.items()})
            pair_ids.append(ids)
        return self._pref_finish(per_pair, pair_ids), partial(self._apply, grads), n_tokens

    def _pair_values(self, rows, batches) -> dict:
        """Per-pair values (numpy, in pair order) of `rows` over `batches`, no gradient (evaluation)."""
        out, ids_all = [], []
        for arrays, ids, valid, ref in self._pair_micro_batches(rows, batches):
            values = self._pref_value(*self._pref_batch(arrays, valid, ref, max(len(ids), 1), 1))
            mx.eval(values)
            out.append({k: np.array(v) for k, v in values.items()})
            ids_all.append(ids)
        return loop.gather_pairs(self.cfg.objective, out, ids_all)

    def _apply(self, grads, lr: float) -> float:
        """Clip and apply `grads` at learning rate `lr`; returns the global gradient norm."""
        self.optimizer.learning_rate = mx.array(lr, mx.float32)
        norm = self._update(grads)
        mx.eval(norm, self.model.parameters(), self.optimizer.state, mx.random.state)
        return float(norm)

    def _loss_sums(self, rows: Rows, batches) -> tuple[float, float]:
        """(sum of token losses, loss tokens) over `batches` of `rows`, summed across ranks."""
        total, count = mx.array(0.0), mx.array(0.0)
        for idx in batches:
            s, c = self._evaluate(*self._take(rows, idx))
            total, count = total + s, count + c
            mx.eval(total, count)
        total, count = self._all_sum((total, count))
        return float(total), float(count)

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

    def _restore(self, path: Path):
        """The trainable weights and the optimizer state of checkpoint directory `path`."""
        weights = load_safetensors(path / "weights.safetensors")
        check_names(str(path), weights, dict(tree_flatten(self.model.trainable_parameters())),
                    "weights do not match this model's trainable parameters")
        self.model.load_weights(list(weights.items()), strict=False)
        saved = load_safetensors(path / "optimizer.safetensors")
        check_names(f"{path}/optimizer.safetensors", saved, dict(tree_flatten(self.optimizer.state)),
                    "does not match this run's optimizer state")
        # leaf by leaf and in place: the compiled step holds this very dict (empty sub-trees included)
        self.optimizer.state.update(tree_map_with_path(lambda k, _: saved[k], self.optimizer.state))
        mx.eval(self.model.parameters(), self.optimizer.state)


def _quantize(model, cfg: TrainConfig):
    quantize_model(model, group_size=cfg.quantize_group_size, bits=cfg.quantize)


def prepare_model(model, cfg: TrainConfig, model_name: str):
    """Quantize (QLoRA, MLX's affine 4/8-bit), add adapters or unfreeze (full); returns the adapter_config
    dict or None (`core.loop.prepare_model` with MLX's operations)."""
    return loop.prepare_model(model, cfg, model_name, quantize=_quantize, unfreeze=lambda m: m.unfreeze(),
                              apply_specs=apply_specs)
