"""`finetune(config)`: a whole training run, what `mlx-mistral train` runs, callable from Python.

    import mlx_mistral
    end = mlx_mistral.finetune("configs/mistral-7b-v0.3-qlora-16gb.yaml")   # or a dict, or a TrainConfig
    print(end["reason"], end["final_loss"], end["run_dir"])

The steps: choose the backend (`backends.pick_backend`), resolve the model (a directory, a Hub id, or
`tiny:<preset>` built into `<out>/base`), load it, pack the data's train split (and valid split, or hold
out `val_fraction` of the rows), add adapters (or unfreeze for full fine-tuning), then train with the
JSONL log (and a display when asked) as callbacks. Errors are `ValueError`s naming the file, key or value;
the CLI turns them into click errors.

The run directory is claimed first (core/rundir.py: writable, locked against a second process, refused
when it already holds a run unless `resume` or `overwrite`), before the model loads. `resume` compares the
asked config with the run's `config.yaml` and refuses any "fixed" key that differs (naming each) before
anything is written; the model's fingerprint and the adapter shapes are checked against the checkpoint
when it loads. `config.yaml` is written (with absolute paths) only once the run starts, with
`data_format.json` (the train split's record shapes: chat runs answer in the instruct format).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import backends
from ..core.generation import write_data_format
from ..core.loop import Rows, split_rows
from ..core.rundir import claim
from ..core.train_config import (TrainConfig, config_from_dict, load_config, resolve_dtype, resume_differences,
                                 write_run_config)
from ..core.weights import storage_dtype

DISPLAYS = (None, "plain", "auto")


def as_config(config) -> TrainConfig:
    """A validated `TrainConfig` from a TrainConfig, a dict of config keys, or a YAML file path."""
    if isinstance(config, TrainConfig):
        return config.validate()
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise ValueError(f"config must be a TrainConfig, a dict or a YAML path, got {type(config).__name__}")


def resolve_model(spec: str, run_dir: Path, seed: int = 0, rank0: bool = True, barrier=lambda: None) -> Path:
    """A model directory from a path / Hub id, or "tiny:<preset>": a random model built once into
    `run_dir/base` (see core/tiny.py) by rank 0 while the others wait at `barrier()`."""
    from ..core.hub import resolve_path

    if spec.startswith("tiny:"):
        from ..core.tiny import build_tiny

        base = run_dir / "base"
        if rank0 and not (base / "config.json").exists():
            build_tiny(base, spec.split(":", 1)[1], seed=seed)
        barrier()
        return base
    return resolve_path(spec)


def load_rows(data, tok, cfg: TrainConfig, split: str, stats: dict | None = None):
    """`(Rows, Packed)` of one split of `data` (a dataset path / Hub id, or the config's `datasets` list, mixed
    with their weights: core/mix.py), or (None, None) when the split does not exist (the train split must).
    A progress bar is drawn while tokenizing on a terminal; `stats`, when given, gets what was read."""
    from ..core.mix import load_split
    from ..core.packing import pack
    from ..ui.progress import bytes_bar

    with bytes_bar(f"tokenizing {split}") as progress:
        got = load_split(data, tok, split, loss_on=cfg.loss_on, seed=cfg.seed, progress=progress)
    if got is None:
        return None, None
    docs, masks, read = got
    if stats is not None:
        stats.update(read)
    packed = pack(docs, cfg.seq_len, masks, overlap=cfg.overlap, mode=cfg.packing)
    return Rows.from_packed(packed), packed


def model_key(model_dir: Path, dtype: str) -> str:
    """A key of a model's weights (the hashes of its weight files) and the dtype they are computed in."""
    import hashlib

    from ..core.data import file_hash

    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.npz"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors weight files to key the reference log-probs by")
    h = hashlib.sha256(json.dumps([dtype] + [file_hash(f) for f in files]).encode())
    return h.hexdigest()[:24]


def load_pair_rows(cfg: TrainConfig, tok, b=None, model=None, model_dir: Path | None = None,
                   formats: dict | None = None):
    """(train, val) `PairRows` of a preference dataset (val: valid.jsonl, or `val_fraction` of the pairs
    held out, or None). For full-parameter DPO the reference log-probs of `model` (the initial weights, so
    call this before training) are read from the tokenized cache, or computed once by backend `b` and stored
    there, keyed by the model's weight files and dtype. `formats` counts the train split's record shapes."""
    from ..core.pairs import load_pairs, pack_pairs, read_reference, split_pairs, write_reference
    from ..ui.progress import bytes_bar

    with bytes_bar("tokenizing pairs") as progress:
        train, entry = load_pairs(cfg.data, tok, "train", progress=progress, formats=formats)
    valid = None
    if Path(cfg.data).is_dir() and (Path(cfg.data) / "valid.jsonl").is_file():
        valid = load_pairs(cfg.data, tok, "valid")
    sets = [(train, entry, np.arange(len(train)))]
    if valid is not None:
        sets.append((valid[0], valid[1], np.arange(len(valid[0]))))
    elif cfg.val_fraction > 0:
        tr, va = split_pairs(len(train), cfg.val_fraction, cfg.seed)
        sets = [(train, entry, tr)] + ([(train, entry, va)] if len(va) else [])
    key = model_key(model_dir, "float32") if cfg.objective == "dpo" and cfg.trains_full else None
    out = []
    for pairs, cache_dir, idx in sets:
        rows = pack_pairs([pairs[i] for i in idx], cfg.seq_len)
        if key is not None:
            table = read_reference(cache_dir, key, len(pairs))
            if table is None:
                table = b.reference_table(model, pack_pairs(pairs, cfg.seq_len), cfg.batch_size)
                write_reference(cache_dir, key, table)
            rows.reference = table[idx]
        out.append(rows)
    return out[0], (out[1] if len(out) > 1 else None)


def split_loss(model, tok, data: str, split: str = "test", seq_len: int = 2048, batch_size: int = 4,
               cfg: TrainConfig | None = None):
    """(mean token loss, loss tokens) of a loaded model (either backend) on one split of a dataset, packed and
    masked as training does with `cfg` (a run's config; default: `swa` packing at `seq_len`); ValueError when
    the dataset has no such split."""
    cfg = cfg if cfg is not None else TrainConfig(seq_len=seq_len, packing="swa")
    rows, _ = load_rows(data, tok, cfg, split)
    if rows is None:
        raise ValueError(f"{data} has no {split} split ({split}.jsonl)")
    model.eval()
    return backends.dataset_loss(model, rows, batch_size)


def check_resume(run_dir: Path, cfg: TrainConfig) -> dict:
    """{free key: [saved, asked]} that `--resume` changes; ValueError naming every key it cannot change."""
    saved_path = run_dir / "config.yaml"
    try:
        saved = load_config(saved_path)
    except ValueError as e:
        raise ValueError(f"--resume: the run's {saved_path} cannot be used: {e}") from None
    fixed, free = resume_differences(saved, cfg)
    if fixed:
        lines = "; ".join(f"{k}: {a!r} in the run, {b!r} asked" for k, (a, b) in fixed.items())
        raise ValueError(f"--resume cannot change {', '.join(fixed)} ({lines}): the checkpoint holds tensors or a "
                         "data order made with the run's values. Drop those flags to continue the run, or start a "
                         "new run (another --out, or --overwrite)")
    return {k: [a, b] for k, (a, b) in free.items()}


def evaluate(model, tok, data: str, splits=("train", "valid", "test"), run_dir: str | Path | None = None,
             seq_len: int | None = None, batch_size: int = 4) -> dict[str, dict]:
    """{split: {"loss", "ppl", "tokens"}} for each of `splits` the dataset has, on the masks and rows training
    used: the run's `config.yaml` (packing, seq_len, overlap and what the loss covers) when `run_dir` has one,
    `seq_len` overriding its row length. Splits the dataset lacks are left out; ValueError if none is there."""
    import math

    from ..core.data import resolve_split

    saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
    cfg = load_config(saved) if saved is not None and saved.is_file() else TrainConfig(packing="swa")
    if seq_len is not None:
        cfg = replace(cfg, seq_len=seq_len)
    out = {}
    for split in splits:
        try:
            resolve_split(data, split)
        except ValueError:
            continue
        if Path(data).is_file() and split != splits[0]:
            break  # a single .jsonl file is one split
        loss, count = split_loss(model, tok, data, split, batch_size=batch_size, cfg=cfg)
        out[split] = {"loss": loss, "ppl": math.exp(min(loss, 700)), "tokens": int(count)}
    if not out:
        files = ", ".join(s + ".jsonl" for s in splits)
        raise ValueError(f"{data} has none of the splits {', '.join(splits)} ({files})")
    return out


def finetune(config, *, resume: bool = False, overwrite: bool = False, display: str | None = None,
             callbacks=()) -> dict:
    """Train as `mlx-mistral train` does and return the trainer's final "end" event (`reason` "done",
    "interrupted" or "nan", `final_loss`, `best_val_loss`, `run_dir`, `message`, ...).

    `config`: a TrainConfig, a dict of config keys, or a YAML path (it needs `model` and `data`).
    `resume`: continue `config.out` from its latest checkpoint (keys it cannot change are refused).
    `overwrite`: start over in a `config.out` that holds a run (its run files are removed; a folder with
    other files is never emptied). `display`: None (nothing printed; the run
    still writes `metrics.jsonl`), "plain" (one line per report) or "auto" (the live dashboard on a
    terminal, plain lines elsewhere). `callbacks`: more callables that receive every event dict.
    Raises ValueError for a bad config, model, dataset or checkpoint.
    """
    if display not in DISPLAYS:
        raise ValueError(f"display must be one of {', '.join(map(repr, DISPLAYS))}, got {display!r}")
    cfg = as_config(config).with_absolute_paths()
    if not cfg.model:
        raise ValueError("config has no 'model': set it to a model directory, Hub id or tiny:<preset>")
    if not (cfg.data or cfg.datasets):
        raise ValueError("config has no 'data' (a dataset path or Hub id) nor 'datasets' (sources to mix)")
    from ..ui.loggers import check_reporters

    check_reporters(cfg.report_to)  # a missing extra fails now, not after loading the model
    if resume and cfg.dtype == "auto":  # auto continues in the dtype the run started in (its config.yaml)
        try:
            cfg = replace(cfg, dtype=load_config(Path(cfg.out) / "config.yaml").dtype)
        except ValueError:
            pass  # check_resume says what is wrong with the run's config.yaml
    b = backends.get(backends.pick_backend(cfg.backend))
    group = b.init_group()
    rank0 = group is None or group.rank() == 0
    run_dir = Path(cfg.out)
    lock = claim(run_dir, resume=resume, overwrite=overwrite) if rank0 else None
    try:
        changes = check_resume(run_dir, cfg) if resume else {}
        return _finetune(b, cfg, group, rank0, run_dir, resume, changes, display, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _finetune(b, cfg, group, rank0, run_dir, resume, changes, display, callbacks) -> dict:
    model_dir = resolve_model(cfg.model, run_dir, cfg.seed, rank0, lambda: b.barrier(group))
    dtype, why = (("float32", "full fine-tuning keeps fp32 master weights") if cfg.trains_full else
                  resolve_dtype(cfg.dtype, storage_dtype(model_dir), b.slow_dtypes()))
    if not cfg.trains_full:
        cfg = replace(cfg, dtype=dtype)  # config.yaml records the dtype used, so --resume loads the same
    model, tok = b.load(model_dir, dtype=dtype)
    data, read = cfg.datasets or cfg.data, {"sources": [], "formats": {}}
    context = {}
    if cfg.objective == "sft":
        from ..core.packing import context_stats

        train_rows, packed = load_rows(data, tok, cfg, "train", read)
        # a single file is the train split; its validation rows are held out (val_fraction), not the file again
        val_rows = None if isinstance(data, str) and Path(data).is_file() else load_rows(data, tok, cfg, "valid")[0]
        if val_rows is None and cfg.val_fraction > 0:
            train_rows, val_rows = split_rows(packed, cfg.val_fraction, cfg.seed)
        context = context_stats(packed, train_rows.segment_ids)  # the rows trained on; the split's documents
    else:
        if cfg.datasets:
            raise ValueError("config key 'datasets' (a mix of sources) is for supervised fine-tuning; a preference "
                             f"run (fine_tune: {cfg.fine_tune}) reads one dataset of pairs: set 'data' instead")
        train_rows, val_rows = load_pair_rows(cfg, tok, b, model, model_dir, read["formats"])
    lora_cfg = b.prepare_model(model, cfg, str(model_dir))
    return _train(b, model, cfg, train_rows, val_rows, run_dir, lora_cfg, str(model_dir), group, rank0, resume,
                  changes, display, callbacks, tok,
                  {"dtype": dtype, "dtype_reason": why, "data_sources": read["sources"], **context},
                  read.get("formats", {}))


def _train(b, model, cfg, train_rows, val_rows, run_dir: Path, lora_cfg, model_name: str, group, rank0: bool,
           resume: bool, changes: dict, display: str | None, callbacks, tok, start_info: dict | None = None,
           formats: dict | None = None) -> dict:
    """The trainer of backend `b` with the JSONL log (and the display) on rank 0; the "end" event."""
    from ..ui.callbacks import JSONLLogger
    from ..ui.loggers import make_reporters

    callbacks = list(callbacks)
    shown = log = None
    reporters = []
    if rank0:
        def on_start(event):  # the checkpoint (if any) has loaded: nothing refused the run, record its config
            if event["event"] == "start":
                write_run_config(run_dir, cfg)
                write_data_format(run_dir, formats or {})  # how `generate` / `chat` format prompts for this run
                if lora_cfg is None:  # full fine-tuning: the run directory becomes a loadable model directory
                    shutil.copy(tok.path, run_dir / tok.path.name)

        log = JSONLLogger(run_dir / "metrics.jsonl")
        callbacks[:0] = [on_start, log]
        reporters = make_reporters(cfg.report_to, run_dir, cfg.to_dict())  # W&B / TensorBoard (report_to)
        callbacks += reporters
        if display is not None:
            from ..ui.dashboard import make_callback

            shown = make_callback(plain=True if display == "plain" else None, total_steps=cfg.steps)
            callbacks.append(shown)
    try:
        trainer = b.Trainer(model, cfg, train_rows, val_rows, run_dir, callbacks, lora_config=lora_cfg,
                            model_name=model_name, group=group)
        trainer.resume_changes = changes
        trainer.start_info = dict(start_info or {})
        if shown is not None and hasattr(shown, "__enter__"):
            with shown:
                return trainer.run(resume=resume)
        return trainer.run(resume=resume)
    finally:
        if log is not None:
            log.close()
        for r in reporters:
            r.close()
