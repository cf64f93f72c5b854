"""Tokenizer files for exported directories, and the export chat templates: the HF `chat_template` and the GGUF's
`tokenizer.chat_template` (Jinja) and the Ollama Modelfile TEMPLATE (Go text/template), which render a
conversation to exactly the tokens training used (`core.chat.encode_chat`, itself equal to mistral-common's
`encode_chat_completion`).

Formats (`chat_format` decides one for a tokenizer, as training does):
- "v1" (Mistral 7B v0.1; `[INST]` is plain text): `<s>[INST] {system}\\n\\n{user} [/INST] {answer}</s>[INST] ...`,
  the joined system prompt on the FIRST user turn;
- "v2", "v3" (SentencePiece, `[INST]`/`[/INST]` control tokens): `<s>[INST]{user}[/INST]{answer}</s>`, the joined
  system prompt on the LAST user turn, answers right-stripped of spaces;
- "v7" (SentencePiece): every system message stays in place as `[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT]`;
- "tekken" (Tekken v3: Mistral-Nemo) as v2/v3, "tekken-v7" (Tekken v7: Mistral Small 3) as v7.
Before v7 a conversation whose first non-system message is not a user one gets an empty user turn first.
Consecutive messages of one role are merged with "\\n\\n"; a system message between two of them keeps them apart.

Where the spaces come from. mistral-common encodes every piece of text on its own, so with SentencePiece each
piece starts with the dummy prefix "▁". The templates never write that space: the tokenizer that reads the
rendered text adds it.
- llama.cpp (so Ollama, which hands the rendered prompt to llama-server, and the GGUF's own template) adds "▁"
  before every text fragment that follows a special token, or starts the prompt; exactly SentencePiece's rule.
- transformers' LlamaTokenizer with `legacy=True` (what the export's tokenizer_config.json asks for) does the
  same through its Metaspace pre-tokenizer, except that it adds nothing to a fragment that already starts with
  a space. `hf_chat_template` therefore writes one extra space before a v2/v3/v7 fragment that starts with a
  space; `gguf_chat_template` (for llama.cpp) does not. For v1 and Tekken the two are the same string.
Tekken (byte-level BPE) has no dummy prefix, so its templates carry no spaces either.

Ollama's data model (template/template.go, server/prompt.go): the template sees `.Messages` (Role, Content, ...)
after consecutive same-role messages were merged with "\\n\\n" (system messages too) and `.System` (all system
messages joined). The templates work from `.Messages` and skip empty system messages as mistral-common does. A
final assistant message is a prefill in Ollama: it is rendered without EOS, as mistral-common renders an
assistant message with `prefix=True`.

Where each template goes: `hf_chat_template` -> tokenizer_config.json (transformers, vLLM, mlx-lm);
`gguf_chat_template` -> the GGUF's `tokenizer.chat_template` (llama.cpp, Ollama with OLLAMA_GO_TEMPLATE=0);
`ollama_template` -> the Modelfile's TEMPLATE (what Ollama serves: our Jinja names no tools or thinking, so
Ollama prefers the Go TEMPLATE). Known limits: Ollama merges consecutive messages of one role, system messages
included, before any template runs, so two consecutive system messages (v7: two [SYSTEM_PROMPT] blocks) or an
empty system message followed by another cannot be given back; transformers' LlamaTokenizer(legacy=True)
(converted from tokenizer.model) splits a run of two or more spaces before a word differently from
SentencePiece whatever the template (the mistral-common tokenizer backend of `write_hf_tokenizer` is exact).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..core.chat import chat_version
from ..core.io import atomic_path, write_json, write_text
from ..core.tokenizer import Tokenizer

FORMATS = ("v1", "v2", "v3", "v7", "tekken", "tekken-v7")
STOPS = ("[INST]", "[/INST]", "</s>")
_SPM_SPACED = ("v2", "v3", "v7")  # SentencePiece with control tokens: text fragments follow a control token
_V7 = ("v7", "tekken-v7")


def chat_format(tok: Tokenizer) -> str:
    """The chat format of a tokenizer, one of FORMATS, decided exactly as
    training decides it (`core.chat.chat_version`: Tekken's declared version, else SentencePiece's control
    tokens), so an export never formats differently from its run. Not from mistral-common's `from_file`, which
    reads a SentencePiece version off the file name and calls any plain `tokenizer.model` v1. "v2" never comes
    back: v2 and v3 format conversations alike (they differ in tool calls only) and training calls both v3."""
    version = chat_version(tok)  # ValueError naming the version when training does not support it
    if tok.kind == "spm":
        return version
    fmt = "tekken" if version == "v3" else f"tekken-{version}"
    if fmt not in FORMATS:
        raise ValueError(f"{tok.path.name}: Tekken instruct version {version} has no export chat template "
                         f"(supported: {', '.join(FORMATS)})")
    return fmt


def _check(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; expected one of {', '.join(FORMATS)}")


# ---- Jinja (HF tokenizer_config.json, GGUF tokenizer.chat_template) ---------------------------------------
_MERGE = (
    # messages -> ns.turns (same-role runs merged; a system message in between keeps them apart)
    "{%- set ns = namespace(turns=[], rest=[], system='', prev='', carrier=-1) %}"
    "{%- for m in messages %}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Only system, user and assistant messages are supported, got ' + m['role']) }}"
    "{%- elif m['content'] is not string %}"
    "{{- raise_exception('Message content must be a string') }}"
    "{%- elif m['role'] == ns.prev and m['role'] != 'system' %}"
    "{%- set ns.turns = ns.turns[:-1] + [{'role': m['role'], "
    "'content': ns.turns[-1]['content'] + '\\n\\n' + m['content']}] %}"
    "{%- else %}"
    "{%- set ns.turns = ns.turns + [{'role': m['role'], 'content': m['content']}] %}"
    "{%- endif %}"
    "{%- set ns.prev = m['role'] %}"
    "{%- endfor %}"
)

_PRE_V7 = (
    # pull system messages out into one prompt; start with a user turn
    "{%- set ns.rest = [] %}"
    "{%- for t in ns.turns %}"
    "{%- if t['role'] == 'system' %}"
    "{%- if t['content'] %}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + t['content'] %}"
    "{%- endif %}"
    "{%- else %}{%- set ns.rest = ns.rest + [t] %}{%- endif %}"
    "{%- endfor %}"
    "{%- set ns.turns = ns.rest %}"
    "{%- if not ns.turns or ns.turns[0]['role'] != 'user' %}"
    "{%- set ns.turns = [{'role': 'user', 'content': ''}] + ns.turns %}"
    "{%- endif %}"
)


def _jinja(fmt: str, pad_leading_space: bool) -> str:
    _check(fmt)
    pad = pad_leading_space and fmt in _SPM_SPACED

    def text(expr: str) -> str:  # a text fragment that follows a control token
        return f"((' ' if {expr}.startswith(' ') else '') + {expr})" if pad else expr

    strip = "" if fmt == "v1" else ".rstrip(' ')"
    answer = "t['content']" + strip
    out = "{{- bos_token }}" + _MERGE
    if fmt in _V7:
        out += ("{%- for t in ns.turns %}"
                "{%- if t['role'] == 'system' %}"
                "{{- '[SYSTEM_PROMPT]' + " + text("t['content']") + " + '[/SYSTEM_PROMPT]' }}"
                "{%- elif t['role'] == 'user' %}{{- '[INST]' + " + text("t['content']") + " + '[/INST]' }}"
                "{%- else %}{{- " + text(answer) + " + eos_token }}{%- endif %}"
                "{%- endfor %}")
        return out
    out += _PRE_V7
    if fmt == "v1":
        out += "{%- set ns.carrier = 0 %}"  # the first user turn carries the system prompt
    else:
        out += ("{%- for t in ns.turns %}{%- if t['role'] == 'user' %}{%- set ns.carrier = loop.index0 %}"
                "{%- endif %}{%- endfor %}")  # the last one
    out += ("{%- for t in ns.turns %}"
            "{%- if t['role'] == 'user' %}"
            "{%- set content = (ns.system + '\\n\\n' + t['content']) if (ns.system and loop.index0 == ns.carrier) "
            "else t['content'] %}")
    if fmt == "v1":  # "[INST]" is text: a user turn right after another one needs its own leading space
        out += ("{{- (' ' if loop.index0 > 0 and ns.turns[loop.index0 - 1]['role'] == 'user' else '') }}"
                "{{- '[INST] ' + content + ' [/INST]' }}"
                "{%- else %}{{- ' ' + " + answer + " + eos_token }}{%- endif %}")
    else:
        out += ("{{- '[INST]' + " + text("content") + " + '[/INST]' }}"
                "{%- else %}{{- " + text(answer) + " + eos_token }}{%- endif %}")
    return out + "{%- endfor %}"


def _lines(jinja: str) -> str:
    """One tag a line, for people reading tokenizer_config.json: every tag opens with "{%-" or "{{-", which eats
    the newline before it, so the rendering is unchanged."""
    return re.sub(r"(?<=.)(\{[%{]-)", r"\n\1", jinja)


def hf_chat_template(fmt: str) -> str:
    """The `chat_template` for tokenizer_config.json, read by transformers' LlamaTokenizer(legacy=True)
    (SentencePiece) or a tokenizers BPE without prefix space (Tekken). A final assistant message gets its EOS unless
    the caller asks `continue_final_message=True`; `add_generation_prompt` changes nothing (Mistral formats have no
    assistant header)."""
    return _lines(_jinja(fmt, pad_leading_space=True))


def gguf_chat_template(fmt: str) -> str:
    """The Jinja template for GGUF's `tokenizer.chat_template`, read by llama.cpp's tokenizer (and Ollama's native
    chat mode): as `hf_chat_template`, without the space transformers' Metaspace needs before a leading space."""
    return _lines(_jinja(fmt, pad_leading_space=False))


# Files a source directory may carry that describe its tokenizer; copied verbatim when present.
HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v2", "tokenizer.model.v3",
                      "tokenizer.model.v7", "tekken.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def copy_file(src: Path, dst: Path):
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_hf_tokenizer(tok: Tokenizer, src_dir: Path, out_dir: Path, backend: str = "llama") -> list[str]:
    """Copy the source's tokenizer files into `out_dir`; when it has no `tokenizer_config.json`, write one
    that `transformers.AutoTokenizer` loads, with the chat template. Returns the file names written.

    backend "llama": SentencePiece through transformers' `LlamaTokenizer` (what Mistral's Hub repos ship;
    readable everywhere, but transformers' converted tokenizer splits leading and repeated spaces
    differently from SentencePiece). "mistral-common": transformers' `MistralCommonBackend`, which calls
    mistral-common and so gives exactly our ids (needs mistral-common where it is loaded). Tekken always
    goes through mistral-common (transformers picks it for `tekken.json`).
    """
    if backend not in ("llama", "mistral-common"):
        raise ValueError(f"tokenizer backend must be 'llama' or 'mistral-common', got {backend!r}")
    written = []
    for name in HF_TOKENIZER_FILES:
        if (src_dir / name).exists():
            copy_file(src_dir / name, out_dir / name)
            written.append(name)
    if tok.path.parent != src_dir or tok.path.name not in written:
        name = "tekken.json" if tok.kind == "tekken" else "tokenizer.model"
        copy_file(tok.path, out_dir / name)
        written.append(name)
    if "tokenizer_config.json" in written:
        return written
    template = hf_chat_template(chat_format(tok))
    if tok.kind == "tekken" or backend == "mistral-common":
        cfg = {"tokenizer_class": "MistralCommonBackend", "chat_template": template}
    else:
        sp = tok._sp
        cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": sp.id_to_piece(tok.bos_id),
               "eos_token": sp.id_to_piece(tok.eos_id), "unk_token": sp.id_to_piece(tok.unk_id),
               "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True,
               "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
               "chat_template": template}
    write_json(out_dir / "tokenizer_config.json", cfg)
    written.append("tokenizer_config.json")
    return written


# ---- Ollama (Go text/template) ------------------------------------------------------------------------------
# rstrip: the text without its trailing spaces, with text/template's builtins only ("slice . 1" is one byte
# shorter, so "len (slice . 1)" is len-1; a trailing 0x20 byte is always a whole UTF-8 character).
_RSTRIP = ('{{- define "rstrip" }}{{ if . }}{{ if eq (slice . (len (slice . 1))) " " }}'
           '{{ template "rstrip" (slice . 0 (len (slice . 1))) }}{{ else }}{{ . }}{{ end }}{{ end }}{{ end }}\n')


def ollama_template(fmt: str, eos: str = "</s>") -> str:
    """The Modelfile TEMPLATE: Ollama renders `.Messages` (already merged) with it and llama-server tokenizes the
    text with BOS added and special tokens parsed. A final assistant message (a prefill) gets no EOS."""
    _check(fmt)
    answer = "{{ $m.Content }}" if fmt == "v1" else '{{ template "rstrip" $m.Content }}'
    end = "{{ if not $last }}" + eos + "{{ end }}"
    if fmt in _V7:
        lines = [
            "{{- range $i, $m := .Messages }}",
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
            '{{- if eq $m.Role "system" }}[SYSTEM_PROMPT]{{ $m.Content }}[/SYSTEM_PROMPT]',
            '{{- else if eq $m.Role "user" }}[INST]{{ $m.Content }}[/INST]',
            '{{- else if eq $m.Role "assistant" }}' + answer + end,
            "{{- end }}",
            "{{- end }}",
        ]
        return _RSTRIP + "\n".join(lines)
    open_, close_, before_answer = ("[INST] ", " [/INST]", " ") if fmt == "v1" else ("[INST]", "[/INST]", "")
    lines = [
        # the system prompt (non-empty system contents joined), the first role, the first and last user turns
        '{{- $system := "" }}{{- $firstRole := "" }}{{- $first := -1 }}{{- $lastUser := -1 }}',
        "{{- range $i, $m := .Messages }}",
        '{{- if eq $m.Role "system" }}',
        '{{- if $m.Content }}{{ if $system }}{{ $system = print $system "\\n\\n" $m.Content }}'
        "{{ else }}{{ $system = $m.Content }}{{ end }}{{ end }}",
        "{{- else }}",
        "{{- if not $firstRole }}{{ $firstRole = $m.Role }}{{ end }}",
        '{{- if eq $m.Role "user" }}{{ $lastUser = $i }}{{ if lt $first 0 }}{{ $first = $i }}{{ end }}{{ end }}',
        "{{- end }}",
        "{{- end }}",
        # the user turn that carries the system prompt: v1 the first, later versions the last; -1 is the
        # empty user turn a conversation gets first when it does not start with one
        ('{{- $carrier := $first }}{{ if ne $firstRole "user" }}{{ $carrier = -1 }}{{ end }}' if fmt == "v1"
         else "{{- $carrier := $lastUser }}"),
        '{{- if ne $firstRole "user" }}' + open_
        + '{{ if and $system (lt $carrier 0) }}{{ $system }}{{ "\\n\\n" }}{{ end }}' + close_ + "{{ end }}",
        '{{- $prev := "" }}',
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        # v1's "[INST]" is text: a user turn right after another one (a system message between) needs a space
        '{{- if eq $m.Role "user" }}' + ('{{ if eq $prev "user" }} {{ end }}' if fmt == "v1" else "") + open_
        + '{{ if and $system (eq $i $carrier) }}{{ $system }}{{ "\\n\\n" }}{{ end }}{{ $m.Content }}' + close_,
        '{{- else if eq $m.Role "assistant" }}' + before_answer + answer + end,
        "{{- end }}",
        '{{- if ne $m.Role "system" }}{{ $prev = $m.Role }}{{ end }}',
        "{{- end }}",
    ]
    return ("" if fmt == "v1" else _RSTRIP) + "\n".join(lines)


def ollama_modelfile(gguf_name: str, fmt: str, num_ctx: int, eos: str = "</s>") -> str:
    """A Modelfile for `ollama create NAME -f Modelfile`: the GGUF, the TEMPLATE of chat format `fmt` (one of
    FORMATS; `chat_format(tok)` for a tokenizer), stop strings and num_ctx."""
    template = ollama_template(fmt, eos)
    if '"""' in template:  # Ollama's parser ends a TEMPLATE at the first """
        raise ValueError("an Ollama TEMPLATE cannot contain three double quotes")
    stops = list(STOPS) if eos in STOPS else [*STOPS, eos]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tok: Tokenizer, num_ctx: int) -> Path:
    """Write the Modelfile beside a GGUF (atomically) for the tokenizer's chat format; returns its path."""
    path = gguf_path.parent / "Modelfile"
    write_text(path, ollama_modelfile(gguf_path.name, chat_format(tok), num_ctx, tok.id_to_piece(tok.eos_id)))
    return path


__all__ = ["FORMATS", "STOPS", "chat_format", "hf_chat_template", "gguf_chat_template", "ollama_template",
           "ollama_modelfile", "write_hf_tokenizer", "write_modelfile"]
