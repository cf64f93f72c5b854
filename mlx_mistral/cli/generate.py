"""`mlx-mistral generate` and `mlx-mistral chat`: streaming generation on either backend, with prompts formatted
the way the run was trained (core/generation.py: `prompt_format`, `encode_turns`)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

_HELP_FORMAT = ("Prompts are formatted the way the run was trained: a run trained on chats answers in the "
                "tokenizer's instruct format ([INST] ... [/INST], with --system), a run trained on text or "
                "prompt/completion records continues raw text (read from the run's data_format.json; without "
                "one, raw). --chat / --raw override.")


def _options(f):
    """The options `generate` and `chat` share: model, adapter, prompt format and sampling."""
    opts = [
        click.option("--model", "model_path", required=True, help="Model directory or Hugging Face repo id."),
        click.option("--adapter", type=click.Path(file_okay=False, exists=True),
                     help="Run directory whose LoRA adapters to apply (adapters.safetensors + adapter_config.json)."),
        click.option("--chat", "fmt", flag_value="chat", default=None,
                     help="Format prompts in the tokenizer's instruct format, whatever the run was trained on."),
        click.option("--raw", "fmt", flag_value="raw",
                     help="Send the prompt as raw text (<s>prompt), whatever the run was trained on."),
        click.option("--system", help="System prompt (chat format only)."),
        click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1),
                     help="Most new tokens to generate per answer."),
        click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
                     help="Sampling temperature; 0 is greedy."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
                     help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this; "
                          "1 is off."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Keep only the k most likely tokens; 0 is off."),
        click.option("--min-p", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
                     help="Drop tokens less likely than this fraction of the most likely one; 0 is off."),
        click.option("--repetition-penalty", default=1.0, show_default=True,
                     type=click.FloatRange(min=0.0, min_open=True),
                     help="Divide the positive logits (multiply the negative ones) of recent tokens by this; "
                          "1 is off."),
        click.option("--repetition-context", default=64, show_default=True, type=click.IntRange(min=0),
                     help="How many recent tokens (prompt included) the repetition penalty looks at; 0 = all."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling."),
        click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Cast weights to this dtype (default: as stored)."),
        click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "mlx", "torch"]),
                     help="auto: MLX on Apple silicon, torch with CUDA; on other machines see the README."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


class _Session:
    """A loaded model, its prompt format and sampling settings: what both commands run."""

    def __init__(self, model_path, adapter, fmt, system, max_tokens, dtype, backend, **sampling):
        from ..backends import load, load_adapters
        from ..core.generation import Sampling, prompt_format

        try:
            Sampling(**sampling).validate()
            self.model, self.tok = load(model_path, backend=backend, dtype=dtype)
            if adapter:
                load_adapters(self.model, adapter)
            model_dir = Path(model_path) if Path(model_path).is_dir() else None
            self.fmt, why = prompt_format(fmt, adapter, model_dir)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        if system is not None and self.fmt != "chat":
            raise click.BadParameter(f"a system prompt needs the chat format, and the prompt format is raw ({why}); "
                                     "pass --chat", param_hint="--system")
        self.system, self.max_tokens, self.sampling = system, max_tokens, sampling
        click.echo(f"[prompt format: {self.fmt}, {why}]", err=True)

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def answer(self, turns: list[dict]) -> str:
        """Stream the answer to `turns` (ending with a user turn) to stdout, then the numbers to stderr."""
        from ..backends import stream_generate
        from ..core.generation import GenerationStats, TextStream, encode_turns

        try:
            ids = encode_turns(self.tok, self.messages(turns), self.fmt)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        stats, text = GenerationStats(), TextStream(self.tok)
        for t in stream_generate(self.model, ids, self.max_tokens, stop_ids={self.tok.eos_id}, stats=stats,
                                 **self.sampling):
            if t != self.tok.eos_id:
                click.echo(text.add(t), nl=False)
        click.echo()
        click.echo(f"[{stats.summary()}]", err=True)
        return text.text


def _session_args(f):
    @functools.wraps(f)
    def wrapper(model_path, adapter, fmt, system, max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
                repetition_context, seed, dtype, backend, **rest):
        session = _Session(model_path, adapter, fmt, system, max_tokens, dtype, backend, temp=temp, top_p=top_p,
                           top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                           repetition_context=repetition_context, seed=seed)
        return f(session, **rest)
    return wrapper


@click.command(help="Generate an answer to a prompt, streaming tokens as they come; then the stop reason, prompt "
               "and generation tokens/s and the peak memory (on stderr).\n\n" + _HELP_FORMAT)
@_options
@click.option("--prompt", required=True, help="The prompt: a user message in the chat format, text in the raw one.")
@_session_args
def generate(session, prompt):
    session.answer([{"role": "user", "content": prompt}])


@click.command(help="Talk with a model in the terminal, turn after turn: every prompt carries the conversation so "
               "far (raw format: the transcript continues as one text). Type /reset to start over, /exit (or "
               "Ctrl-D) to leave.\n\n" + _HELP_FORMAT)
@_options
@_session_args
def chat(session):
    stdin = sys.stdin
    turns: list[dict] = []
    while True:
        click.echo(">>> ", nl=False, err=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            click.echo(err=True)
            return
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            turns = []
            click.echo("[conversation cleared]", err=True)
            continue
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line})
        turns.append({"role": "assistant", "content": session.answer(turns)})
