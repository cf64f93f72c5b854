"""llama.cpp as the GGUF judge, run in a child process so a crash in native code fails one test, not the suite.

A native library built for one CPU can crash on another (a llama.cpp compiled for an AMD EPYC segfaulted in
`decode` on an Intel Xeon with AMX). Every llama.cpp call of the tests goes through `run()`: the child
process loads the GGUF file, answers a list of requests and writes the answers to a folder; if it dies
by a signal, the test fails with the file's name and the signal, and the other tests still report.

This file is also the child's program (`python llama_judge.py REQUEST.json`); the child imports only
llama_cpp, numpy and the standard library.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

TIMEOUT_S = 300
# Set by `make test`: the judge must run, so a missing llama-cpp-python fails instead of skipping.
REQUIRED = os.environ.get("MLX_MISTRAL_REQUIRE_LLAMA") == "1"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def require():
    """Skip (or, under `make test`, fail) when llama-cpp-python is not installed."""
    import pytest

    if available():
        return
    msg = "llama-cpp-python (the GGUF judge) is not installed: `make test` builds it portably"
    if REQUIRED:
        pytest.fail(msg + " (MLX_MISTRAL_REQUIRE_LLAMA=1: the llama tests must run)")
    pytest.skip(msg)


def _call(request: dict, workdir: Path, what: str) -> dict:
    """Run the child on `request`; its answers, or a test failure naming `what` and the signal."""
    import pytest

    require()
    workdir.mkdir(parents=True, exist_ok=True)
    req = workdir / "request.json"
    req.write_text(json.dumps(dict(request, out=str(workdir))))
    try:
        p = subprocess.run([sys.executable, __file__, str(req)], capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"llama.cpp did not finish within {TIMEOUT_S} s on {what}")
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        pytest.fail(f"llama.cpp crashed with {sig} on {what}\n{p.stderr[-2000:]}")
    if p.returncode != 0:
        pytest.fail(f"llama.cpp judge failed (exit {p.returncode}) on {what}\n{p.stderr[-4000:]}")
    answers = json.loads((workdir / "answers.json").read_text())
    for a in answers:
        if "npy" in a:
            a["value"] = np.load(a.pop("npy"))
    return answers


def run(model: str | Path, ops: list[dict], workdir: Path, lora_path: str | Path | None = None,
        n_ctx: int = 256) -> list:
    """Load `model` (and a LoRA GGUF) in llama.cpp with an F32 KV cache and flash attention off, and run
    `ops` in order; returns one answer per op:
    {"op": "tokenize", "text": s} -> ids (BOS added, as llama.cpp tokenizes a prompt);
    {"op": "logits", "ids": ids} -> (len(ids), vocab) array of every position's logits;
    {"op": "greedy", "ids": ids, "n": n} -> the n greedy tokens after ids."""
    what = f"{model}" + (f" with adapter {lora_path}" if lora_path else "")
    request = {"task": "eval", "model": str(model), "lora_path": str(lora_path) if lora_path else None,
               "n_ctx": n_ctx, "ops": ops}
    return [a["value"] for a in _call(request, Path(workdir), what)]


def quantize(src: str | Path, dst: str | Path, ftype: int, workdir: Path) -> int:
    """llama.cpp's own quantizer (`llama_model_quantize`, pure) from `src` to `dst`; its return code."""
    request = {"task": "quantize", "src": str(src), "dst": str(dst), "ftype": int(ftype)}
    return _call(request, Path(workdir), f"{src} (quantizing to {dst})")[0]["value"]


def vocab(model: str | Path, ops: list[dict], workdir: Path) -> list:
    """Load `model` vocabulary-only (a GGUF with no tensors is enough) and run `ops` in order; one answer per op:
    {"op": "tokenize", "text": s, "add_bos": b} -> ids, special tokens parsed (as llama-server tokenizes a prompt);
    {"op": "chat", "template": jinja, "messages": [...], "bos_token": s, "eos_token": s} -> the ids of the prompt
    llama-cpp-python serves a chat with: rendered by its Jinja2ChatFormatter, tokenized with special tokens and
    BOS added only when the template did not write it."""
    request = {"task": "vocab", "model": str(model), "ops": ops}
    return [a["value"] for a in _call(request, Path(workdir), f"{model} (vocabulary only)")]


def system_info(timeout: float = 120) -> str | None:
    """`llama_cpp.llama_print_system_info()` of the installed build (None when not installed)."""
    if not available():
        return None
    p = subprocess.run([sys.executable, "-c", "import llama_cpp, sys; "
                        "sys.stdout.write(llama_cpp.llama_print_system_info().decode())"],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return f"(llama_cpp failed to report: exit {p.returncode}: {p.stderr.strip()[-500:]})"
    return p.stdout.strip()


# ---- the child ------------------------------------------------------------------------------------------
def _child(request_path: str):
    import ctypes

    import llama_cpp

    req = json.loads(Path(request_path).read_text())
    out = Path(req["out"])
    answers = []
    if req["task"] == "crash":  # the harness's own test: a real signal in a real child
        import signal as _signal

        os.kill(os.getpid(), _signal.SIGSEGV)
    if req["task"] == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.pure = req["ftype"], True
        rc = llama_cpp.llama_model_quantize(req["src"].encode(), req["dst"].encode(), ctypes.byref(params))
        answers.append({"value": int(rc)})
    elif req["task"] == "vocab":
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = llama_cpp.Llama(req["model"], vocab_only=True, verbose=False)
        for op in req["ops"]:
            if op["op"] == "tokenize":
                ids = llm.tokenize(op["text"].encode(), add_bos=op["add_bos"], special=True)
            elif op["op"] == "chat":
                fmt = Jinja2ChatFormatter(op["template"], eos_token=op["eos_token"], bos_token=op["bos_token"])
                result = fmt(messages=op["messages"])
                ids = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
            else:
                raise ValueError(f"unknown vocab op {op['op']!r}")
            answers.append({"value": ids})
    else:
        kw = {"lora_path": req["lora_path"]} if req["lora_path"] else {}
        llm = llama_cpp.Llama(req["model"], logits_all=True, type_k=0, type_v=0, flash_attn=False,
                              n_ctx=req["n_ctx"], verbose=False, seed=0, **kw)
        for i, op in enumerate(req["ops"]):
            if op["op"] == "tokenize":
                answers.append({"value": llm.tokenize(op["text"].encode(), add_bos=True)})
            elif op["op"] == "logits":
                llm.reset()
                llm.eval(op["ids"])
                path = out / f"logits{i}.npy"
                np.save(path, np.array(llm.scores[:len(op["ids"])], dtype=np.float32))
                answers.append({"npy": str(path)})
            elif op["op"] == "greedy":
                llm.reset()
                llm.eval(op["ids"])
                toks = []
                for _ in range(op["n"]):
                    t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                    toks.append(t)
                    llm.eval([t])
                answers.append({"value": toks})
            else:
                raise ValueError(f"unknown op {op['op']!r}")
    (out / "answers.json").write_text(json.dumps(answers))


if __name__ == "__main__":
    _child(sys.argv[1])
