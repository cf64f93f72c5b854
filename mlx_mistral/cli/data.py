"""`mlx-mistral data inspect`: documents, tokens, lengths, and what packing buys over padding."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..core.data import LOSS_ON, SPLITS
from ..core.train_config import specs_by_name


def _tokenizer(model: str):
    """A tokenizer from a model directory, a tokenizer file, or a Hub repo id (tokenizer files only)."""
    from ..core.hub import fetch_tokenizer
    from ..core.tokenizer import Tokenizer, find_tokenizer_file

    p = Path(model)
    try:
        if p.is_file():
            return Tokenizer(p)
        if p.is_dir():
            return Tokenizer(find_tokenizer_file(p))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--model") from None
    if model.count("/") != 1:
        raise click.BadParameter(f"{model} is neither a local path nor a Hugging Face repo id", param_hint="--model")
    try:
        return fetch_tokenizer(model)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def context_line(c: dict, seq_len: int, packing: str) -> str:
    """One line of `context_stats` numbers: real tokens per row of capacity, the longest document trained
    whole, what was split."""
    longest = f"longest document trained whole: {c['longest_whole_doc']:,} tokens"
    if c["longest_doc"] > c["longest_whole_doc"]:
        longest += f" (the longest, {c['longest_doc']:,}, is split)"
    split = (f"{c['split_docs']:,} document{'s' * (c['split_docs'] != 1)} split across rows "
             f"({100 * c['split_token_fraction']:.1f}% of tokens)" if c["split_docs"] else "no document split")
    return (f"context ({packing}): {c['context_tokens_per_row']:,.0f} of {seq_len:,} tokens per row used "
            f"({100 * c['context_utilisation']:.1f}%); {longest}; {split}")


@click.group("data")
def data_group():
    """Inspect datasets: tokens, lengths, and what packing buys over padding."""


@data_group.command("inspect")
@click.argument("data")
@click.option("--model", required=True,
              help="Model directory, tokenizer file (tokenizer.model / tekken.json) or Hub repo id; "
                   "only its tokenizer is read.")
@click.option("--seq-len", default=2048, show_default=True, type=click.IntRange(min=2),
              help="Row length of the packed training batches.")
@click.option("--split", default="train", show_default=True,
              help=f"Which split: {', '.join(SPLITS)} (the file of a dataset directory); a Hub dataset may name "
                   "others in its file names (e.g. train_sft).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]),
              help="Read only this format of a Hub dataset's files.")
@click.option("--packing", default=specs_by_name()["packing"]["default"], show_default=True,
              type=click.Choice(specs_by_name()["packing"]["choices"]),
              help=specs_by_name()["packing"]["help"] + " (the config key packing); the context line measures "
                   "this mode.")
@click.option("--overlap", default=0, show_default=True, type=click.IntRange(min=0),
              help="Tokens shared by consecutive chunks of documents longer than --seq-len.")
@click.option("--loss-on", default="default", show_default=True, type=click.Choice(LOSS_ON),
              help=specs_by_name()["loss_on"]["help"] + " (the config key loss_on; see train --help).")
@click.option("--skip-invalid", is_flag=True, help="Skip bad lines (and count them) instead of failing.")
@click.option("--no-cache", is_flag=True, help="Tokenize again instead of using the on-disk cache.")
def inspect_cmd(data, model, seq_len, split, fmt, packing, overlap, loss_on, skip_invalid, no_cache):
    """Documents, tokens, length histogram, packing efficiency and context utilisation (real tokens per row,
    the longest document trained whole) of DATA: a .jsonl or .parquet file, a dataset directory, or a Hugging
    Face Hub dataset id owner/name[@revision] (its JSONL / Parquet files of the split, fetched with
    huggingface_hub; HF_HUB_OFFLINE=1 reads the local cache only)."""
    from rich.console import Console
    from rich.table import Table

    from ..core import chat
    from ..core.data import load_dataset
    from ..core.packing import context_stats, length_histogram, pack
    from ..ui.progress import bytes_bar

    console = Console()
    tok = _tokenizer(model)
    if overlap >= seq_len:
        raise click.BadParameter(f"must be smaller than --seq-len ({seq_len})", param_hint="--overlap")
    with bytes_bar(console=console) as progress:
        try:
            docs, masks, stats = load_dataset(data, tok, split, loss_on=loss_on, skip_invalid=skip_invalid,
                                              cache=not no_cache, progress=progress, fmt=fmt)
        except ValueError as e:
            raise click.ClickException(str(e)) from None

    lengths = np.array([len(d) for d in docs])
    try:
        chat_fmt = f"{chat.chat_version(tok)} chat format"
    except ValueError:
        chat_fmt = "no supported chat format"
    files = stats.get("files", [stats["file"]])
    source = (f"Hub dataset {stats['dataset']}, commit {stats['revision']}: "
              f"{', '.join(f.split(stats['revision'] + '/', 1)[-1] for f in files)}"
              if stats.get("dataset") else stats["file"])
    console.print(f"[bold]{source}[/] with {tok.path.name} ({chat_fmt})"
                  + (" [dim](cached)[/]" if stats["cached"] else ""))
    summary = Table(show_header=False, box=None)
    formats = ", ".join(f"{k}: {v:,}" for k, v in stats["formats"].items())
    length = f"{lengths.min()} / {int(np.median(lengths))} / {lengths.mean():.0f} / {lengths.max()}"
    for k, v in (("documents", f"{len(docs):,}"), ("formats", formats), ("tokens", f"{int(lengths.sum()):,}"),
                 ("loss tokens", f"{stats['n_loss_tokens']:,}"), ("length min / median / mean / max", length),
                 ("skipped lines", f"{stats['skipped']}")):
        summary.add_row(k, v)
    console.print(summary)

    hist = Table(title="document lengths (tokens)", title_justify="left")
    hist.add_column("length", justify="right")
    hist.add_column("docs", justify="right")
    hist.add_column("")
    h = length_histogram(lengths, seq_len)
    while len(h) > 1 and h[0][2] == 0:  # start at the shortest bucket in use
        h = h[1:]
    top = max(c for _, _, c in h) or 1
    for lo, hi, c in h:
        hist.add_row(f"{lo}-{hi}" + (" (split)" if lo > seq_len else ""), f"{c:,}", "█" * round(30 * c / top))
    console.print(hist)

    table = Table(title=f"rows of {seq_len} tokens", title_justify="left")
    for col in ("packing", "rows", "tokens", "efficiency", "split docs", "overlap", "dropped"):
        table.add_column(col, justify="right")
    labels = {"swa": "packed (swa)", "naive": "concatenated (naive)", "none": "padded (none)"}
    chosen = None
    for mode in dict.fromkeys((packing, "swa", "none")):
        p = pack(docs, seq_len, loss_masks=masks, overlap=overlap, mode=mode)
        chosen = chosen or p
        table.add_row(labels[mode], f"{p.rows:,}", f"{p.real_tokens:,}", f"{100 * p.efficiency:.1f}%",
                      f"{p.n_split:,}", f"{p.overlap_tokens:,}", f"{p.dropped_tokens:,}")
    console.print(table)
    console.print(context_line(context_stats(chosen), seq_len, packing))
    for err in stats["errors"]:
        console.print(f"[yellow]skipped[/] {err}")

