"""Experiment loggers beside the dashboard (config key `report_to`): Weights & Biases and TensorBoard.

Each is a trainer callback like the JSONL log (ui/callbacks.py): it receives the event dicts and writes
- "start": the run's config (and the start event's facts: backend, device, dtype, data sources, ...);
- "train": `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_sec`, `train/it_per_sec`,
  `train/tokens`, `train/peak_memory`, `train/active_memory`, `train/packing_efficiency` at its step;
- "eval": `eval/loss` and `eval/ppl` at its step;
- "end": the final loss, best validation loss and the reason the run ended, then closes.
Both are optional extras, imported only when asked: `pip install 'mlx-mistral[wandb]'` /
`'mlx-mistral[tensorboard]'`. TensorBoard event files go to `<run>/tensorboard` (tensorboardX, no
TensorFlow needed). Weights & Biases writes under `<run>/wandb` and keeps one W&B run per run directory
(its id is kept in `<run>/wandb_run_id`, so `--resume` continues the same W&B run); `WANDB_MODE=offline`
works without an account (`wandb sync` uploads later).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

REPORTERS = ("wandb", "tensorboard")
_EXTRAS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboardX", "tensorboard")}  # module, extra
_SCALARS = {"train": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                      "tokens_per_sec": "train/tokens_per_sec", "it_per_sec": "train/it_per_sec",
                      "tokens": "train/tokens", "peak_memory": "train/peak_memory",
                      "active_memory": "train/active_memory", "packing_efficiency": "train/packing_efficiency"},
            "eval": {"val_loss": "eval/loss", "val_ppl": "eval/ppl"}}
_SUMMARY = ("final_loss", "best_val_loss", "reason", "step", "tokens")


def scalars(event: dict) -> dict[str, float]:
    """The numbers a logger records for a "train" or "eval" event, by their logged name ({} otherwise)."""
    names = _SCALARS.get(event.get("event"), {})
    return {name: float(event[k]) for k, name in names.items() if isinstance(event.get(k), (int, float))}


def _require(name: str):
    module, extra = _EXTRAS[name]
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"report_to: {name} needs the {module!r} package: pip install "
                         f"'mlx-mistral[{extra}]'") from None


def check_reporters(names) -> dict:
    """{name: its imported package} for `report_to` = `names`; ValueError naming the extra to install when
    a package is missing, or an unknown name (call it before the long steps of a run)."""
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to: unknown logger(s) {', '.join(unknown)}; choose from {', '.join(REPORTERS)}")
    return {n: _require(n) for n in names}


def make_reporters(names, run_dir: str | Path, config: dict) -> list:
    """The callbacks of `report_to` = `names` (see `check_reporters` for the errors); each has `close()`."""
    modules = check_reporters(names)
    out = []
    for n in names:
        cls = WandbLogger if n == "wandb" else TensorBoardLogger
        out.append(cls(run_dir, config, modules[n]))
    return out


class TensorBoardLogger:
    """Scalars (and the config as text) into TensorBoard event files in `<run_dir>/tensorboard`."""

    def __init__(self, run_dir: str | Path, config: dict, tensorboardX=None):
        tensorboardX = tensorboardX or _require("tensorboard")
        self.logdir = Path(run_dir) / "tensorboard"
        self.writer = tensorboardX.SummaryWriter(logdir=str(self.logdir))
        self.config = config

    def __call__(self, event: dict):
        kind = event.get("event")
        if self.writer is None:
            return
        if kind == "start":
            facts = {k: v for k, v in event.items() if k not in ("event", "time")}
            self.writer.add_text("config", _as_markdown(self.config), event.get("start_step", 0))
            self.writer.add_text("start", _as_markdown(facts), event.get("start_step", 0))
        elif kind in _SCALARS:
            for name, v in scalars(event).items():
                self.writer.add_scalar(name, v, event["step"], walltime=event.get("time"))
        elif kind == "end":
            summary = {k: event.get(k) for k in _SUMMARY}
            self.writer.add_text("end", _as_markdown(summary), event.get("step") or 0)
            self.close()
            return
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLogger:
    """A Weights & Biases run per run directory: config at start, scalars by step, summary at the end."""

    def __init__(self, run_dir: str | Path, config: dict, wandb=None):
        self.wandb = wandb or _require("wandb")
        self.run_dir, self.config, self.run = Path(run_dir), config, None

    def _start(self, event: dict):
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        if not id_file.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(run_id + "\n")
            tmp.replace(id_file)
        facts = {k: v for k, v in event.items() if k not in ("event", "time")}
        self.run = self.wandb.init(project=self.config.get("wandb_project") or "mlx-mistral",
                                   name=self.run_dir.name, dir=str(self.run_dir), id=run_id, resume="allow",
                                   config=dict(self.config, start=facts),
                                   settings=self.wandb.Settings(console="off"))  # the dashboard owns the terminal

    def __call__(self, event: dict):
        kind = event.get("event")
        if kind == "start":
            self._start(event)
        elif self.run is None:
            return
        elif kind in _SCALARS:
            self.run.log(scalars(event), step=event["step"])
        elif kind == "end":
            for k in _SUMMARY:
                if event.get(k) is not None:
                    self.run.summary[k] = event[k]
            self.close()

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


def _as_markdown(d: dict) -> str:
    """A config as a fenced JSON block (TensorBoard renders text as Markdown)."""
    return "```\n" + json.dumps(d, indent=2, default=str) + "\n```"
