"""Export chat templates render conversations to exactly the tokens training used.

References nobody here wrote: mistral-common's `encode_chat_completion` (prompts, prefills) and our chat.py, which
equals it (training sequences); transformers' own `apply_chat_template` / `render_jinja_template` for the Jinja
templates; Go's text/template (tests/go_render.py builds ollama_render/render.go, Ollama's data model) for the Modelfile
TEMPLATE, tokenized by llama.cpp (llama-cpp-python, the GGUF judge, in a child process: tests/llama_judge.py) as
llama-server tokenizes Ollama's prompt: BOS added, special tokens parsed.

Known limits, asserted rather than skipped: Ollama merges consecutive messages of one role (system ones too)
before a template runs (OLLAMA_MERGE_CHANGES_TOKENS); transformers' LlamaTokenizer(legacy=True) splits a run of
spaces before a word differently from SentencePiece (assert_same_but_hf_space_runs).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import gguf
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import mlx_mistral.export.tokenizer_files as T
from mlx_mistral.core.chat import encode_chat, encode_prompt
from mlx_mistral.core.tokenizer import Tokenizer, bundled_tokenizer_path

import go_render  # noqa: E402  (tests/: Go's text/template)
import llama_judge  # noqa: E402  (tests/: llama.cpp in a child process)

FILES = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
         "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7",
         "tekken": "tekken_240911.json", "tekken-v7": None}  # tekken-v7: built from tekken_240911.json below
SPM = ("v1", "v2", "v3", "v7")

S, U, A = "system", "user", "assistant"
CONVERSATIONS = {
    "single": [(U, "What is 2+2?")],
    "single-system": [(S, "You are terse."), (U, "Name a prime.")],
    "multi-system": [(S, "Be kind."), (U, "first"), (A, "one"), (U, "second\nline"), (A, "two\n\nparagraphs"),
                     (U, "third")],
    "multi-system-train": [(S, "Be kind."), (U, "first"), (A, "one"), (U, "second\nline"), (A, "two\n\nparagraphs"),
                           (U, "third"), (A, "three")],
    "multi-no-system": [(U, "Hi!"), (A, "Hello. How can I help?"), (U, "Tell me a joke.")],
    "trailing-spaces-train": [(U, "Hi!"), (A, "Hello.  "), (U, "A joke?"), (A, "No.  ")],
    "system-later": [(U, "q1"), (A, "a1"), (U, "q2"), (S, "a system message mid-way"), (U, "q3")],
    "system-later-train": [(S, "policy"), (U, "q1"), (A, "a1"), (U, "q2"), (S, "a system message mid-way"),
                           (U, "q3"), (A, "a3")],
    "two-systems": [(S, "sys A"), (S, "sys B"), (U, "q")],
    "empty-then-system": [(S, ""), (S, "sys B"), (U, "q")],
    "empty-system": [(S, ""), (U, "q")],
    "merge-runs": [(U, "two user"), (U, "messages in a row"), (A, "merged"), (A, "and two assistant ones"),
                   (U, "next")],
    "assistant-first": [(A, "an assistant turn first"), (U, "q")],
    "system-then-assistant": [(S, "S"), (A, "A0"), (U, "q")],
    "empty-user": [(U, ""), (A, "x"), (U, "q")],
    "spaces-unicode": [(S, "  sys with leading spaces"), (U, "  leading spaces and ünïcödé ✓ 日本語"),
                       (A, " starts with a space"), (U, "```python\ndef f():\n    return 1\n```")],
    "open-answer": [(S, "Answer in one word."), (U, "Capital of France?"), (A, "The capital is")],
}
# Ollama merges consecutive messages of one role, system ones included, before a template sees them; where that
# changes mistral-common's tokens no template can give them back (.Messages and .System are all it gets).
OLLAMA_MERGE_CHANGES_TOKENS = {("v7", "two-systems"), ("tekken-v7", "two-systems"),
                               *((f, "empty-then-system") for f in FILES)}


# ---- references -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory):
    files = {f: bundled_tokenizer_path(n) for f, n in FILES.items() if n}
    d = tmp_path_factory.mktemp("tekken_v7")  # Mistral Small 3's tekken.json: the same tokens, "version": "v7"
    data = json.loads(files["tekken"].read_text())
    data["config"]["version"] = "v7"
    (d / "tekken.json").write_text(json.dumps(data))
    files["tekken-v7"] = d / "tekken.json"
    return files


@functools.lru_cache(maxsize=None)
def _mistral(path, mode):
    return MistralTokenizer.from_file(str(path), mode=mode)


def mistral_common_tokens(path, conv, prefix=False):
    """mistral-common's tokens: serving mode for a prompt (last message user) or a prefill (prefix=True: the final
    assistant message left open), fine-tuning mode otherwise."""
    cls = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    msgs = [cls[r](content=c) for r, c in conv]
    if prefix:
        msgs[-1] = AssistantMessage(content=conv[-1][1], prefix=True)
    mode = ValidationMode.test if conv[-1][0] == U or prefix else ValidationMode.finetuning
    return _mistral(path, mode).encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


@functools.lru_cache(maxsize=None)
def tokenizer(path):
    return Tokenizer(path)


def as_messages(conv):
    return [{"role": r, "content": c} for r, c in conv]


def ollama_collate(conv):
    """What Ollama's template package does to messages before rendering: merge consecutive same-role messages."""
    out = []
    for r, c in conv:
        if out and out[-1][0] == r:
            out[-1] = (r, out[-1][1] + "\n\n" + c)
        else:
            out.append((r, c))
    return out


def wanted(path, conv):
    """(what a full rendering must tokenize to, what a prefill must tokenize to or None)."""
    if conv[-1][0] == U:
        ref = mistral_common_tokens(path, conv)
        assert encode_prompt(tokenizer(path), as_messages(conv)) == ref  # training's prompt is mistral-common's
        return ref, None
    tokens, _ = encode_chat(tokenizer(path), as_messages(conv))  # training's sequence
    assert tokens.tolist() == mistral_common_tokens(path, conv)
    return tokens.tolist(), mistral_common_tokens(path, conv, prefix=True)


CASES = [(f, n) for f in FILES for n in CONVERSATIONS]


def test_chat_format_is_what_training_uses(tokenizer_files, tmp_path):
    """Every tokenizer mistral-common ships; the SentencePiece ones also renamed tokenizer.model, as Hub repos name
    them (mistral-common's from_file reads the version off the name and calls every tokenizer.model v1)."""
    data = bundled_tokenizer_path("tokenizer.model.v1").parent
    want = {"tokenizer.model.v1": "v1", "mistral_instruct_tokenizer_240216.model.v2": "v3",
            "mistral_instruct_tokenizer_240323.model.v3": "v3", "mistral_instruct_tokenizer_241114.model.v7": "v7",
            "mistral_instruct_tokenizer_241114.model.v7m1": "v7", "tekken_240718.json": "tekken",
            "tekken_240911.json": "tekken"}
    assert {p.name for p in data.iterdir() if "token" in p.name or "tekken" in p.name} == set(want)
    for name, fmt in want.items():
        assert T.chat_format(Tokenizer(data / name)) == fmt, name
        if not name.endswith(".json"):  # Tekken declares its version inside the file
            (tmp_path / name).mkdir()
            shutil.copyfile(data / name, tmp_path / name / "tokenizer.model")
            assert T.chat_format(Tokenizer(tmp_path / name / "tokenizer.model")) == fmt, name
    assert T.chat_format(tokenizer(tokenizer_files["tekken-v7"])) == "tekken-v7"
    assert T.hf_chat_template("v2") == T.hf_chat_template("v3") and T.ollama_template("v2") == T.ollama_template("v3")
    with pytest.raises(ValueError, match="unknown chat format 'v9'"):
        T.hf_chat_template("v9")


# ---- Ollama: Go's text/template on Ollama's data model ------------------------------------------------------
@pytest.fixture(scope="session")
def go_render_fn(tmp_path_factory):
    return go_render.build(tmp_path_factory.mktemp("render"))


def modelfile_template(modelfile: str) -> str:
    """The TEMPLATE value as Ollama's parser reads it: everything between TEMPLATE \"\"\" and the next \"\"\";
    the parser keeps newlines, spaces and tabs and drops other non-printable characters."""
    m = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    assert m, modelfile
    assert m.group(1).isascii() and all(c.isprintable() or c in "\n\t" for c in m.group(1))
    return m.group(1)


@pytest.fixture(scope="session")
def ollama_rendered(go_render_fn):
    @functools.lru_cache(maxsize=None)
    def rendered(fmt):
        mf = T.ollama_modelfile("model.gguf", fmt, num_ctx=4096)
        assert modelfile_template(mf) == T.ollama_template(fmt)
        assert [ln for ln in mf.splitlines() if ln.startswith("PARAMETER stop")] == [
            'PARAMETER stop "[INST]"', 'PARAMETER stop "[/INST]"', 'PARAMETER stop "</s>"']
        names = list(CONVERSATIONS)
        return dict(zip(names, go_render_fn(modelfile_template(mf), [as_messages(CONVERSATIONS[n]) for n in names])))
    return rendered


# ---- llama.cpp's tokenizer, from the vocabulary our GGUF export writes --------------------------------------
def _write_vocab_gguf(tok: Tokenizer, out: Path) -> Path:
    from mlx_mistral.export.gguf_model import add_tokenizer

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    add_tokenizer(w, tok, tok.vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def judged(tokenizer_files, ollama_rendered, tmp_path_factory):
    """fmt -> {"ollama": {name: ids}, "gguf": {name: ids}}, all of one format's texts in one llama.cpp child:
    "ollama", the Modelfile TEMPLATE rendered by Go and tokenized as llama-server does (BOS added, special tokens
    parsed); "gguf", the GGUF's own tokenizer.chat_template as llama-cpp-python serves a chat."""
    d = tmp_path_factory.mktemp("vocab")

    @functools.lru_cache(maxsize=None)
    def ids(fmt):
        ollama_texts = ollama_rendered(fmt)
        path = tokenizer_files[fmt]
        vocab = _write_vocab_gguf(tokenizer(path), d / f"{fmt}.gguf")  # the export's own add_tokenizer
        names = list(CONVERSATIONS)
        ops = [{"op": "tokenize", "text": ollama_texts[n], "add_bos": True} for n in names]
        ops += [{"op": "chat", "template": T.gguf_chat_template(fmt), "messages": as_messages(CONVERSATIONS[n]),
                 "bos_token": "<s>", "eos_token": "</s>"} for n in names]
        got = llama_judge.vocab(vocab, ops, d / f"{fmt}-judge")
        return {"ollama": dict(zip(names, got[:len(names)])), "gguf": dict(zip(names, got[len(names):]))}
    return ids


@pytest.mark.llama
@pytest.mark.parametrize("fmt, name", CASES)
def test_ollama_template_gives_training_tokens(fmt, name, tokenizer_files, judged):
    """The Modelfile TEMPLATE, rendered by text/template and tokenized by llama.cpp with BOS and special tokens,
    is the training prompt; a final assistant message is a prefill (no EOS), as mistral-common's prefix=True."""
    path, conv = tokenizer_files[fmt], CONVERSATIONS[name]
    full, prefill = wanted(path, conv)
    ids = judged(fmt)["ollama"][name]
    if (fmt, name) in OLLAMA_MERGE_CHANGES_TOKENS:
        merged = ollama_collate(conv)
        assert mistral_common_tokens(path, merged) != full  # the limit is real ...
        assert ids == mistral_common_tokens(path, merged)  # ... and the template is exact on what Ollama gives it
        return
    assert mistral_common_tokens(path, ollama_collate(conv), prefix=prefill is not None) == (prefill or full)
    assert ids == (prefill or full)
    if prefill is not None:
        assert ids == full[:-1]  # the training sequence without its final EOS


# ---- Jinja: transformers ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_files, tmp_path_factory):
    """The tokenizer transformers loads from an export: LlamaTokenizer(legacy=True) from tokenizer.model and the
    tokenizer_config.json the export writes; Tekken converted by transformers' own convert_tekken_tokenizer."""
    from transformers import LlamaTokenizer
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    def load(fmt):
        return _load("tekken" if fmt.startswith("tekken") else fmt)  # tekken-v7: the same vocabulary

    @functools.lru_cache(maxsize=None)
    def _load(fmt):
        if fmt == "tekken":
            return convert_tekken_tokenizer(str(tokenizer_files["tekken"]), chat_template=T.hf_chat_template("tekken"))
        d = tmp_path_factory.mktemp(f"hf_{fmt}")
        shutil.copyfile(tokenizer_files[fmt], d / "tokenizer.model")
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True,
            "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
            "chat_template": T.hf_chat_template(fmt)}))
        return LlamaTokenizer.from_pretrained(str(d), legacy=True)
    return load


def _fragments(ids, special):
    """Split ids at special tokens: [(special or None, [ids of the text between])]."""
    out, cur, head = [], [], None
    for i in ids:
        if i in special:
            out.append((head, cur))
            head, cur = i, []
        else:
            cur.append(i)
    out.append((head, cur))
    return out


def has_space_run(text, controls):
    """Whether a piece of the text between control tokens, as SentencePiece sees it (with its dummy prefix),
    has two or more spaces before a non-space: where transformers' converted BPE and SentencePiece split apart."""
    return any(re.search(" {2,}[^ ]", ("" if p.startswith(" ") else " ") + p)
               for p in _split_text(text, controls) if p not in controls)


def assert_same_but_hf_space_runs(tok, hf, got, want):
    """transformers' LlamaTokenizer (converted from tokenizer.model) splits a run of spaces before a word as
    '▁▁' + 'word' where SentencePiece gives '▁' + '▁word', whatever the template. Check that every difference is
    such a piece of text, with the very same characters, between the same control tokens."""
    if got == want:
        return
    assert tok.kind == "spm", (got, want)
    special = {i for i in got + want if tok._sp.is_control(i)}
    a, b = _fragments(got, special), _fragments(want, special)
    assert [h for h, _ in a] == [h for h, _ in b]
    for (_, x), (_, y) in zip(a, b):
        if x != y:
            tx, ty = ("".join(hf.convert_ids_to_tokens(z)) for z in (x, y))
            assert tx == ty and re.search("▁{2,}[^▁]", ty), (tx, ty)


def controls_of(fmt):
    return {"<s>", "</s>"} | (set() if fmt == "v1" else {"[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"})


@pytest.mark.parametrize("fmt, name", CASES)
def test_hf_apply_chat_template(fmt, name, tokenizer_files, hf_tokenizer):
    """transformers' apply_chat_template with the exported chat_template: the training sequence (the whole
    conversation), the prompt, and with continue_final_message the prefill. Exact, except where the SentencePiece
    text has a run of spaces before a word (transformers' converted tokenizer, not the template: see above)."""
    path, conv = tokenizer_files[fmt], CONVERSATIONS[name]
    full, prefill = wanted(path, conv)
    hf, tok = hf_tokenizer(fmt), tokenizer(path)
    template = T.hf_chat_template(fmt)
    kw = {"chat_template": template, "tokenize": True, "return_dict": False}
    runs = tok.kind == "spm" and has_space_run(_render(template, conv), controls_of(fmt))
    check = functools.partial(assert_same_but_hf_space_runs, tok, hf) if runs else _assert_equal
    check(hf.apply_chat_template(as_messages(conv), add_generation_prompt=conv[-1][0] == U, **kw), full)
    if prefill is not None:
        check(hf.apply_chat_template(as_messages(conv), continue_final_message=True, **kw), prefill)


def _assert_equal(got, want):
    assert got == want


def _render(template, conv, **kw):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([as_messages(conv)], chat_template=template, bos_token="<s>",
                                        eos_token="</s>", **kw)
    return rendered[0]


def _split_text(text, specials):
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [p for p in re.split(pattern, text) if p]


@pytest.mark.parametrize("fmt, name", CASES)
def test_hf_template_text_is_exact_under_sentencepiece(fmt, name, tokenizer_files):
    """The rendered text itself is exact: transformers renders it; each piece between special tokens is encoded
    by SentencePiece/Tekken the way transformers' pre-tokenizer sees it (a '▁' prefix unless the piece starts
    with a space). With the space-run split of the converted BPE out of the way, every case is exact."""
    path, conv = tokenizer_files[fmt], CONVERSATIONS[name]
    full, prefill = wanted(path, conv)
    tok = tokenizer(path)
    controls = controls_of(fmt)

    def encode(text):
        ids = []
        for part in _split_text(text, controls):
            if part in controls:
                ids.append(tok.special_id(part) if part.startswith("[") else
                           {"<s>": tok.bos_id, "</s>": tok.eos_id}[part])
            elif tok.kind == "spm" and part.startswith(" "):
                ids += tok.encode(part[1:], bos=False)  # SentencePiece's dummy prefix stands for that space
            else:
                ids += tok.encode(part, bos=False)
        return ids

    assert encode(_render(T.hf_chat_template(fmt), conv)) == full
    if prefill is not None:
        assert encode(_render(T.hf_chat_template(fmt), conv, continue_final_message=True)) == prefill


@pytest.mark.llama
@pytest.mark.parametrize("fmt, name", CASES)
def test_gguf_chat_template_through_llama_cpp_python(fmt, name, tokenizer_files, judged):
    """The Jinja template the GGUF carries (tokenizer.chat_template) as llama-cpp-python serves a chat: rendered by
    its Jinja2ChatFormatter, tokenized by llama.cpp with special tokens and no second BOS."""
    full, _ = wanted(tokenizer_files[fmt], CONVERSATIONS[name])
    assert judged(fmt)["gguf"][name] == full


@pytest.mark.parametrize("fmt", FILES)
def test_ollama_keeps_the_modelfile_template(fmt):
    """Ollama (server/images.go) serves the GGUF's Jinja template instead of the Modelfile TEMPLATE when the Jinja
    one looks more capable: it mentions "tools"/"tool_call" or has <think> tags. Ours must not."""
    for jinja in (T.gguf_chat_template(fmt), T.hf_chat_template(fmt)):
        assert not any(w in jinja for w in ("tools", "tool_call", "<think>", "</think>"))


# ---- render.go itself follows Ollama's data model ---------------------------------------------------------
def test_render_go_data_model(go_render_fn):
    """Expectations read off Ollama's template/template.go: merged consecutive messages, .System joined, a
    legacy (.System/.Prompt/.Response) template run per turn with the last turn cut after .Response, and a
    trailing {{ .Response }} added to a template naming neither Messages nor Response."""
    def render(template, convs):
        return go_render_fn(template, [as_messages(c) for c in convs])

    conv = [(S, "a"), (S, "b"), (U, "x"), (U, "y"), (A, "z")]

    assert render("{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}", [conv]) == [
        "a\n\nb|system=a\n\nb;user=x\n\ny;assistant=z;"]
    legacy = "{{ if .System }}S:{{ .System }} {{ end }}U:{{ .Prompt }} A:{{ .Response }}</s>"
    assert render(legacy, [[(S, "s"), (U, "u1"), (A, "a1"), (U, "u2")], [(U, "u"), (A, "prefill")]]) == [
        "S:s U:u1 A:a1</s>U:u2 A:", "U:u A:prefill"]
    assert render("<{{ .Prompt }}>", [[(U, "hi"), (A, "yo")]]) == ["<hi>yo"]
    assert render('{{ template "t" .Messages }}{{ define "t" }}{{ len . }}{{ end }}', [conv]) == ["3"]
