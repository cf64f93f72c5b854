"""The training step on torch: the `core.loop.TrainLoop` hooks, with the MLX trainer's loss and optimizer.

Notable:
- Everything that decides *what* is computed comes from core: `TrainConfig`, the data order
  (`batch_rows`, `micro_rows`), the dropout seed of each micro-step, `Rows`, and the step loop with its
  events, evaluation, checkpoints, resume, SIGINT and NaN handling (`TrainLoop`). The loss is the same
  sum of token losses over the global batch divided by its number of loss tokens, so with fp32, dropout 0
  and the same initial adapters both backends take the same steps (tests/backends/torch/test_torch_trainer.py).
- AdamW written out (`AdamW` below) with MLX's formula and its `bias_correction` switch, rather than
  `torch.optim.AdamW`, which cannot turn bias correction off.
- On CUDA the forward runs under bf16 autocast (LoRA weights, gradients and optimizer state stay fp32)
  and each block is `torch.compile`d when `compile` is on; on CPU everything is fp32 and eager (compiling
  costs more than it saves on short CPU runs).
- Data parallelism: launched by `torchrun`, the model is wrapped in DDP (NCCL on CUDA, gloo on CPU);
  accumulation micro-steps run under `no_sync()`; each rank's loss is scaled by the world size so DDP's
  gradient *average* becomes the global batch's sum / global loss tokens, as on one rank.
- Checkpoints have the MLX trainer's layout and names: `checkpoints/step-N/{weights,optimizer}.safetensors`
  (optimizer keys `<param>.m`, `<param>.v`, `step`) and `state.json`. No pickle anywhere.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ...core import loop
from ...core.checkpoints import check_names
from ...core.loop import Rows, TrainLoop, batch_rows, dropout_seed, micro_rows
from ...core.train_config import TrainConfig
from .loader import load_safetensors, save_safetensors
from . import preference
from .lora import adapter_weights, apply_specs, quantize_4bit, save_adapters


# ---- the optimizer ------------------------------------------------------------------------------------
class AdamW:
    """AdamW exactly as `mlx.optimizers.AdamW`: decoupled decay p *= 1 - lr * wd, then Adam with optional
    bias correction (c1 = lr / (1 - b1^t), c2 = 1 / sqrt(1 - b2^t), p -= c1 * m / (sqrt(v) * c2 + eps))."""

    def __init__(self, params: dict[str, torch.nn.Parameter], betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01, bias_correction=True):
        self.params = params
        self.b1, self.b2 = betas
        self.eps, self.weight_decay, self.bias_correction = eps, weight_decay, bias_correction
        self.step = 0
        self.m = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}

    @torch.no_grad()
    def update(self, lr: float):
        self.step += 1
        b1, b2, t = self.b1, self.b2, self.step
        for k, p in self.params.items():
            g = p.grad.float()
            m, v = self.m[k], self.v[k]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w = p.float() * (1 - lr * self.weight_decay)
            if self.bias_correction:
                c1, c2 = lr / (1 - b1 ** t), (1 - b2 ** t) ** -0.5
                w = w - c1 * m / (v.sqrt() * c2 + self.eps)
            else:
                w = w - lr * m / (v.sqrt() + self.eps)
            p.copy_(w.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors named as the MLX trainer's optimizer.safetensors."""
        out = {"step": torch.tensor(self.step, dtype=torch.int64)}
        for k in self.params:
            out[f"{k}.m"], out[f"{k}.v"] = self.m[k], self.v[k]
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str):
        check_names(source, [k for k in state if k.endswith((".m", ".v"))],
                    [f"{k}.{s}" for k in self.params for s in ("m", "v")],
                    "optimizer state does not match this model's trainable parameters")
        self.step = int(state["step"])
        for k in self.params:
            self.m[k].copy_(state[f"{k}.m"])
            self.v[k].copy_(state[f"{k}.v"])


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale gradients so their global norm is at most `max_norm` (MLX's rule: factor min(max/(norm+1e-6), 1));
    returns the norm before clipping. `max_norm` 0 measures only."""
    grads = [p.grad for p in params]
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
    if max_norm > 0:
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(factor.to(g.dtype))
    return float(norm)


# ---- the process group --------------------------------------------------------------------------------
def init_distributed(device: torch.device):
    """Join the `torchrun` process group (NCCL on CUDA, gloo otherwise); (rank, world). (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def init_group():
    """None: under `torchrun` the trainer joins the process group itself (`init_distributed`)."""
    return None


def barrier(group):
    """No-op: torch's ranks synchronise in the trainer (DDP)."""


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ---- memory -------------------------------------------------------------------------------------------
def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def active_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def device_name(device: torch.device) -> str:
    """A torch device, readably: "cuda:0 (NVIDIA H200)", "mps (Apple M2 Pro)", "cpu (AMD EPYC 7B13, 16 cores)"."""
    from ...core.device import cpu_name, describe

    if device.type == "cuda":
        return describe(str(device), torch.cuda.get_device_name(device))
    if device.type == "mps":
        return describe("mps", cpu_name())
    return describe(device.type)


def memory_total(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def token_losses(model, tokens, segment_ids, positions, targets, weights, loss_chunk=None):
    """(sum of weighted token losses, number of loss tokens) of one batch, fp32. Logits are computed only
    where the weight is non-zero (not at padding, document ends or masked prompt tokens), and only
    `loss_chunk` tokens at a time (the model's default: `blockwise.loss_chunk`), never as one (N, vocab)."""
    at = weights > 0  # (B, L)
    ce = model(tokens, segment_ids=segment_ids, positions=positions, logits_at=at, targets=targets[at],
               loss_chunk=loss_chunk)  # (N,)
    w = weights[at].float()
    return (ce * w).sum(), w.sum()


def _tensors(arrays, device) -> tuple:
    """int64 tensors on `device` of a `Rows.take` tuple."""
    return tuple(torch.as_tensor(np.asarray(a, np.int64), device=device) for a in arrays)


@torch.no_grad()
def dataset_loss(model, rows: Rows, batch_size: int = 4) -> tuple[float, int]:
    """(mean token loss, number of loss tokens) of `model` over all `rows`, fp32, in batches."""
    device = next(model.parameters()).device

    def sums(idx):
        s, n = token_losses(model, *_tensors(rows.take(idx), device))
        return float(s), int(n)

    return loop.mean_token_loss(rows, batch_size, sums)


# ---- the trainer --------------------------------------------------------------------------------------
class TorchTrainer(TrainLoop):
    """Runs `cfg.steps` optimizer steps on `train` rows, writing the run directory (rank 0); the torch twin
    of the MLX backend's `Trainer` (same constructor, same `run`, same events and files).

    `model` is a `backends.torch.model.Model` with LoRA already applied (or unfrozen for full fine-tuning) on
    `device`; under `torchrun` the trainer joins the process group itself (`group` is accepted for the
    MLX trainer's signature and must be None).
    """

    backend = "torch"

    def __init__(self, model, cfg: TrainConfig, train: Rows, val: Rows | None = None, run_dir=None,
                 callbacks=(), lora_config: dict | None = None, model_name: str = "", group=None,
                 save_full=None, device=None, autocast: bool | None = None):
        if group is not None:
            raise ValueError("the torch backend runs data parallel under torchrun, not mlx.launch: "
                             "torchrun --nproc_per_node N -m mlx_mistral.cli train --backend torch ...")
        self.device = torch.device(device) if device is not None else _device_of(model)
        rank, world = init_distributed(self.device)
        super().__init__(model, cfg, train, val, run_dir, callbacks, lora_config, model_name, save_full,
                         rank=rank, world=world)
        self.autocast = self.device.type == "cuda" if autocast is None else autocast
        model.checkpoint_layers = cfg.grad_checkpoint
        model.attention_mode, model.attention_block = cfg.attention, cfg.attention_block
        if cfg.compile and self.device.type == "cuda":
            for layer in model.model.layers:
                layer.compile(dynamic=False)
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.optimizer = AdamW(self.params, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay,
                               cfg.bias_correction)
        self.forward = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               find_unused_parameters=model.args.is_moe and lora_config is None)

    # -- backend hooks of TrainLoop -----------------------------------------------------------------------
    def _attention_info(self) -> dict:
        """The attention path of this run's rows, for the start event: `attention` ("blockwise", "flex" or
        "sdpa") and `attention_block` (the query block size, None when not blockwise)."""
        path, block = self.model.attention_path(self.cfg.seq_len, self.device)
        return {**super()._attention_info(), "attention": path, "attention_block": block}

    def _device_name(self) -> str:
        return device_name(self.device)

    def _counts(self) -> tuple[int, int]:
        return sum(p.numel() for p in self.params.values()), total_count(self.model)

    def _memory(self) -> tuple[int, int]:
        return peak_memory(self.device), active_memory(self.device)

    def _memory_total(self) -> int:
        return memory_total(self.device)

    def _reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _take(self, rows: Rows, idx) -> tuple:
        return _tensors(rows.take(idx), self.device)

    def _amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    # -- one optimizer step -------------------------------------------------------------------------------
    def train_step(self, step: int):
        """Accumulate the gradient of the global batch of `step` into `.grad`; returns (loss, update, loss
        tokens); the caller applies `update(lr)` after checking the loss."""
        cfg = self.cfg
        if cfg.objective != "sft":
            return self._preference_step(step)
        rows = batch_rows(cfg.seed, step, self.global_batch, len(self.train_rows))
        n_tokens = int(self.train_rows.weights[rows].sum())
        denom = float(max(n_tokens, 1))
        for p in self.params.values():
            p.grad = None
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for m in range(cfg.grad_accum):
            idx = micro_rows(rows, m, self.rank, self.world, cfg.batch_size)
            torch.manual_seed(dropout_seed(cfg.seed, step, m, self.rank))
            sync = m == cfg.grad_accum - 1 or self.world == 1
            with (nullcontext() if sync else self.forward.no_sync()), self._amp():
                s, _ = token_losses(self.forward, *self._take(self.train_rows, idx))
            (s * (self.world / denom)).backward()  # DDP averages over ranks: undo it
            loss_sum += s.detach()
        return float(self._all_sum(loss_sum)) / denom, self._apply, n_tokens

    def _preference_step(self, step: int):
        """DPO / ORPO: per micro-step the reference pass (adapters off, or the precomputed table), then the
        policy pass and its backward; the loss and metrics from the per-pair values of the whole batch."""
        micro, n_pairs, nll_tokens, n_tokens = self._pref_step_plan(step)
        for p in self.params.values():
            p.grad = None
        self.model.train()
        per_pair, pair_ids = [], []
        for m, (arrays, ids, valid, ref) in enumerate(micro):
            torch.manual_seed(dropout_seed(self.cfg.seed, step, m, self.rank))
            with self._amp():
                loss, values = preference.micro_loss(self.model, self.cfg, self.pair_slots, arrays, valid, ref,
                                                     n_pairs, nll_tokens, self.device)
            loss.backward()
            per_pair.append({k: v.detach().float().cpu().numpy() for k, v in values.items()})
            pair_ids.append(ids)
        return self._pref_finish(per_pair, pair_ids), self._apply, n_tokens

    @torch.no_grad()
    def _pair_values(self, rows, batches) -> dict:
        """Per-pair values (numpy, in pair order) of `rows` over `batches`, no gradient (evaluation)."""
        out, ids_all = [], []
        for arrays, ids, valid, ref in self._pair_micro_batches(rows, batches):
            with self._amp():
                _, values = preference.micro_loss(self.model, self.cfg, self.pair_slots, arrays, valid, ref,
                                                  max(len(ids), 1), 1, self.device)
            out.append({k: v.float().cpu().numpy() for k, v in values.items()})
            ids_all.append(ids)
        return loop.gather_pairs(self.cfg.objective, out, ids_all)

    def _apply(self, lr: float) -> float:
        """Clip the accumulated gradient and take an AdamW step at `lr`; returns the global norm."""
        norm = clip_grad_norm(list(self.params.values()), self.cfg.grad_clip)
        self.optimizer.update(lr)
        return norm

    @torch.no_grad()
    def _loss_sums(self, rows: Rows, batches) -> tuple[float, float]:
        """(sum of token losses, loss tokens) over `batches` of `rows`, summed across ranks."""
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        for idx in batches:
            with self._amp():
                s, c = token_losses(self.model, *self._take(rows, idx))
            acc += torch.stack([s.double(), c.double()])
        total, count = self._all_sum(acc).tolist()
        return total, count

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _weights(self) -> dict:
        if self.lora_config is not None:
            return adapter_weights(self.model)
        return dict(self.params)

    def _write_tensors(self, tmp: Path):
        save_safetensors(tmp / "weights.safetensors", self._weights())
        save_safetensors(tmp / "optimizer.safetensors", self.optimizer.state_dict())

    def _save_adapters(self):
        save_adapters(self.run_dir, self.model, self.lora_config)

    def _save_model_weights(self, path: Path):
        save_safetensors(path, {k: v.float() for k, v in self.model.state_dict().items()})

    def _restore(self, path: Path):
        """The trainable weights and the optimizer state of checkpoint directory `path`."""
        weights = load_safetensors(path / "weights.safetensors", self.device)
        check_names(str(path), weights, self.params, "weights do not match this model's trainable parameters")
        with torch.no_grad():
            for k, v in weights.items():
                self.params[k].copy_(v)
        self.optimizer.load_state_dict(load_safetensors(path / "optimizer.safetensors", self.device), str(path))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def total_count(model) -> int:
    """Parameters of the model, counting 4-bit weights at their unpacked size."""
    n = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n += int(np.prod(qs.shape)) if qs is not None else p.numel()
    return n


# ---- putting a run together ------------------------------------------------------------------------------
def _quantize(model, cfg: TrainConfig):
    if cfg.quantize != 4:
        raise ValueError(f"config key 'quantize' = {cfg.quantize}: the torch backend quantizes to 4-bit NF4 "
                         "(bitsandbytes) only; use quantize: 4 or the MLX backend")
    quantize_4bit(model)


def prepare_model(model, cfg: TrainConfig, model_name: str):
    """Quantize (QLoRA, bitsandbytes NF4 on CUDA), add adapters or unfreeze (full); returns the
    adapter_config dict or None (`core.loop.prepare_model` with torch's operations)."""
    return loop.prepare_model(model, cfg, model_name, quantize=_quantize,
                              unfreeze=lambda m: m.requires_grad_(True), apply_specs=apply_specs)
