"""What generation does the same on both backends: sampling settings and their checks, the chunks of a prompt's
prefill, the prompt format of a run, streaming text out of token ids, and the numbers a generation reports.

A prompt is prefilled in chunks of `prefill_chunk` tokens (all but its last token, which the first decode
step feeds), so a long prompt never materialises a full (L, L) score matrix and a sliding-window model's
cache never exceeds its window. The sampling itself is tensor code and lives in each backend, in the order
transformers' `generate` applies its processors: repetition penalty on the raw logits, then (unless greedy)
temperature, top-k, top-p, min-p, and a draw from what is left.

Prompt formats: a run trained on chats ({"messages": ...}) answers prompts in the tokenizer's instruct format
(core/chat.py), a run trained on text or prompt/completion records continues raw text (`<s>prompt`, exactly
how training encoded a completion's prompt). `finetune` records the train split's record shapes in the run
directory (`data_format.json`, `write_data_format`); `prompt_format` reads it back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

DATA_FORMAT_FILE = "data_format.json"
PROMPT_FORMATS = ("chat", "raw")
STOP_REASONS = ("eos", "max_tokens")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temp 0 is greedy (after the repetition penalty); top_k 0, top_p 1, min_p 0
    and repetition_penalty 1 are off. The penalty looks at the last `repetition_context` tokens of the prompt
    and the generation (0: all of them, as transformers does)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    seed: int = 0

    def validate(self) -> "Sampling":
        """This, or a ValueError naming the setting that is out of range."""
        checks = [("temp", self.temp >= 0, ">= 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 = off)"), ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
                  ("repetition_context", self.repetition_context >= 0, ">= 0 (0 = the whole sequence)")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"sampling setting {name} must be {want}, got {getattr(self, name)!r}")
        return self

    def history(self, tokens: list[int]) -> list[int]:
        """The tokens the repetition penalty looks at, or [] when it is off."""
        if self.repetition_penalty == 1.0:
            return []
        return tokens[-self.repetition_context:] if self.repetition_context else tokens


def check_args(prompt: list[int], temp: float = 0.0, top_p: float = 1.0, **sampling) -> Sampling:
    """The validated `Sampling` of these settings; ValueError for an empty prompt or a setting out of range."""
    if not prompt:
        raise ValueError("the prompt is empty: encode at least a BOS token")
    return Sampling(temp=temp, top_p=top_p, **sampling).validate()


def prefill_spans(n_prompt: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of the prefill chunks of an `n_prompt`-token prompt (its last token is not prefilled)."""
    return [(s, min(s + chunk, n_prompt - 1)) for s in range(0, n_prompt - 1, chunk)]


# ---- what a generation reports ------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """Filled in by the backends' `stream_generate(..., stats=)`: prompt tokens and the seconds until the first
    new token (prefill and one step), generated tokens and the seconds after the first, why it stopped, and the
    peak memory (`memory_kind` says what was measured)."""

    prompt_tokens: int = 0
    prompt_s: float = 0.0
    tokens: int = 0
    gen_s: float = 0.0
    reason: str = ""
    peak_memory: int = 0
    memory_kind: str = ""
    _t0: float = field(default=0.0, repr=False)
    _t1: float = field(default=0.0, repr=False)

    def start(self, n_prompt: int):
        self.prompt_tokens, self.tokens, self.reason, self._t0 = n_prompt, 0, "", time.perf_counter()

    def token(self):
        now = time.perf_counter()
        if self.tokens == 0:
            self.prompt_s, self._t1 = now - self._t0, now
        self.tokens += 1
        self.gen_s = now - self._t1

    def stop(self, reason: str, peak_memory: int, memory_kind: str):
        self.reason, self.peak_memory, self.memory_kind = reason, int(peak_memory), memory_kind

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        """Tokens per second after the first one (whose time is the prompt's)."""
        return (self.tokens - 1) / self.gen_s if self.tokens > 1 and self.gen_s > 0 else 0.0

    def summary(self) -> str:
        stop = {"eos": "end of sequence (EOS)", "max_tokens": "max tokens reached"}.get(self.reason, self.reason)
        return (f"stop: {stop} · prompt {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s · "
                f"generation {self.tokens} tokens, {self.gen_tps:.1f} tok/s · "
                f"peak memory {self.peak_memory / 1e9:.2f} GB ({self.memory_kind})")


class TextStream:
    """Text of a growing list of token ids, piece by piece, as a terminal should show it: a piece ending in an
    incomplete UTF-8 character (decoded as U+FFFD) is held back until the next token completes it."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)


# ---- a run's prompt format ----------------------------------------------------------------------------------
def write_data_format(run_dir: str | Path, formats: dict[str, int]):
    """Record what training read: the train split's record shapes (counts of "chat", "completion", "text") and
    the prompt format generation should use ("chat" when chats are the most common shape, else "raw")."""
    from .io import write_json

    if not formats:
        raise ValueError("no record shapes to record: the train split had no documents")
    top = max(formats, key=lambda k: (formats[k], k == "chat"))
    write_json(Path(run_dir) / DATA_FORMAT_FILE, {"formats": dict(formats),
                                                  "prompt_format": "chat" if top == "chat" else "raw"})


def recorded_prompt_format(*dirs) -> tuple[str | None, Path | None]:
    """(prompt format, the file it came from) of the first directory holding `data_format.json`, or
    (None, None) when training recorded none (a run from before it was recorded, or a base model)."""
    for d in dirs:
        if d is None:
            continue
        f = Path(d) / DATA_FORMAT_FILE
        if f.is_file():
            try:
                fmt = json.loads(f.read_text())["prompt_format"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{f} is not a data format record (want {{\"prompt_format\": "
                                 f"{' or '.join(map(repr, PROMPT_FORMATS))}}})") from None
            if fmt not in PROMPT_FORMATS:
                raise ValueError(f"{f}: prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
            return fmt, f
    return None, None


def prompt_format(override: str | None, *dirs) -> tuple[str, str]:
    """(format, why): `override` ("chat" / "raw", from --chat / --raw) if given, else what training recorded in
    the first of `dirs` (the adapter's run directory, then the model directory), else "raw"."""
    if override is not None:
        if override not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {override!r}")
        return override, "asked for"
    fmt, f = recorded_prompt_format(*dirs)
    if fmt is not None:
        return fmt, f"as trained ({f})"
    return "raw", "no data format recorded by training: raw text (pass --chat for the instruct format)"


def encode_turns(tok, messages: list[dict], fmt: str) -> list[int]:
    """Prompt ids of a conversation ending with a user turn. "chat": the tokenizer's instruct format, exactly
    as training encoded it (mistral-common's). "raw": BOS + the texts of the turns, one after the other (a
    single turn is `<s>prompt`, how training encoded a completion's prompt); system messages refuse."""
    if fmt == "chat":
        from .chat import encode_prompt

        return encode_prompt(tok, messages)
    if fmt != "raw":
        raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    if any(m["role"] == "system" for m in messages):
        raise ValueError("a system prompt needs the chat format: drop --system or pass --chat")
    return tok.encode("".join(m["content"] for m in messages), bos=True)
