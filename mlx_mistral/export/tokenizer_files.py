"""Tokenizer files for exported directories, the chat template, and Ollama's Modelfile.

The chat templates reproduce mistral-common's instruct encodings (no tools) for each tokenizer version:
- v1 (Mistral 7B v0.1, `[INST]` as plain text): `<s>[INST] user [/INST] answer</s>`, system prompt
  before the first user message;
- v2/v3 SentencePiece (`[INST]` a control token): `<s>[INST] user[/INST] answer</s>`, system prompt
  before the last user message;
- Tekken (v3, Nemo): the same without the spaces (Tekken has no dummy prefix);
- v7: a `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]` block instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..core.io import atomic_path, write_json, write_text
from ..core.tokenizer import Tokenizer

_ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{%- endif %}")
_SYSTEM = ("{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
           "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}")


def _template(inst: str, end_inst: str, answer_prefix: str, system_on: str) -> str:
    """Jinja for `[INST]`-style templates; `system_on` is "first" or "last" (the user message that carries it)."""
    carrier = "loop.first" if system_on == "first" else "loop.last"
    return ("{{- bos_token }}" + _SYSTEM + "{%- for message in messages %}" + _ALTERNATE
            + "{%- if message['role'] == 'user' %}"
            + "{%- if system and " + carrier + " %}{%- set content = system + '\\n\\n' + message['content'] %}"
            + "{%- else %}{%- set content = message['content'] %}{%- endif %}"
            + "{{- '" + inst + "' + content + '" + end_inst + "' }}"
            + "{%- elif message['role'] == 'assistant' %}{{- '" + answer_prefix + "' + message['content'] + eos_token }}"
            + "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
            + "{%- endfor %}")


def _template_v7(space: str) -> str:
    return ("{{- bos_token }}" + _SYSTEM + "{%- if system %}{{- '[SYSTEM_PROMPT]' + system + '[/SYSTEM_PROMPT]' }}"
            "{%- endif %}{%- for message in messages %}" + _ALTERNATE
            + "{%- if message['role'] == 'user' %}{{- '[INST]" + space + "' + message['content'] + '[/INST]' }}"
            "{%- elif message['role'] == 'assistant' %}{{- '" + space + "' + message['content'] + eos_token }}"
            "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
            "{%- endfor %}")


def tokenizer_version(tok: Tokenizer) -> str:
    """mistral-common's version of a tokenizer ("v1", "v2", "v3", "v7", ...)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tok.path)).instruct_tokenizer.tokenizer.version.value


def chat_template(tok: Tokenizer) -> str:
    """The Jinja chat template matching mistral-common's encoding for this tokenizer."""
    version = tokenizer_version(tok)
    if tok.kind == "tekken":
        return _template_v7("") if int(version[1:]) >= 7 else _template("[INST]", "[/INST]", "", "last")
    if version == "v1":
        return _template("[INST] ", " [/INST]", " ", "first")
    if version in ("v2", "v3"):
        return _template("[INST] ", "[/INST]", " ", "last")
    return _template_v7(" ")


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
    template = chat_template(tok)
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


# ---- Ollama -------------------------------------------------------------------------------------------
def ollama_modelfile(gguf_name: str, tok: Tokenizer, num_ctx: int) -> str:
    """A Modelfile so `ollama create NAME -f Modelfile` serves the GGUF with Mistral's prompt format."""
    version = tokenizer_version(tok)
    sp = "" if tok.kind == "tekken" else " "
    inst_end = " [/INST]" if version == "v1" else "[/INST]"
    eos = tok.id_to_piece(tok.eos_id)
    template = ("{{- range $i, $m := .Messages }}\n"
                "{{- if eq $m.Role \"user\" }}[INST]" + sp
                + "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
                "{{ $m.Content }}" + inst_end + "\n"
                "{{- else if eq $m.Role \"assistant\" }}" + sp + "{{ $m.Content }}" + eos + "\n"
                "{{- end }}\n{{- end }}" + sp)
    stops = ["[INST]", "[/INST]", eos]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tok: Tokenizer, num_ctx: int) -> Path:
    path = gguf_path.parent / "Modelfile"
    write_text(path, ollama_modelfile(gguf_path.name, tok, num_ctx))
    return path


__all__ = ["chat_template", "write_hf_tokenizer", "ollama_modelfile", "write_modelfile", "tokenizer_version"]
