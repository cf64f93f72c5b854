"""The fused model as a GGUF file for llama.cpp and Ollama, written with gguf-py's `GGUFWriter`.

What llama.cpp expects of a Mistral-family model, and what mlx-lm's exporter gets wrong:
- architecture `llama` (llama.cpp's Mistral path for these models) with Q and K rows permuted from
  HF's rotate-half layout to the interleaved one llama.cpp's RoPE uses, per head: `n_kv_heads` for K
  (names and permutation from core/weights.py);
- `rope.dimension_count` = head_dim (Nemo: 128, not hidden / heads = 160), `rope.freq_base` always,
  `attention.key_length` / `value_length`, a `file_type` that says what the file holds;
- the tokenizer from `tokenizer.model` (tokens, real scores, types) or `tekken.json` (GPT-2 style BPE
  with merges, pre-tokenizer `tekken`), via gguf-py's `MistralVocab`, and the chat template;
- Mixtral's experts stacked (E, out, in) as `ffn_{gate,up,down}_exps`, the router `ffn_gate_inp` in F32.
llama.cpp does not implement Mistral's sliding window: it attends to the whole context. The export
returns a warning for such models rather than silently changing what the model computes.
Tensors are streamed: one tensor is in numpy at a time, so peak memory is ~ the model plus one tensor.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..core.config import ModelArgs
from ..core.io import atomic_path
from ..core.tokenizer import Tokenizer
from ..core.weights import gguf_name, rope_heads, to_interleaved
from .tokenizer_files import chat_format, gguf_chat_template, write_modelfile
from .weights import Progress, load_fused

T = gguf.MODEL_TENSOR
_KEEP_F32 = {T.FFN_GATE_INP, T.ATTN_NORM, T.FFN_NORM, T.OUTPUT_NORM}  # llama.cpp never quantizes these

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --dtype -> (tensor type written by gguf-py, file_type)
NUMPY_TYPES = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
               "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
               "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1)}
# K-quants: llama.cpp's quantizer; rows (ncols) not a multiple of 256 fall back per tensor
K_QUANTS = {"q4_k_m": (F.MOSTLY_Q4_K_M, "Q5_0"), "q5_k_m": (F.MOSTLY_Q5_K_M, "Q5_1"), "q6_k": (F.MOSTLY_Q6_K, "Q8_0")}
GGUF_TYPES = tuple(NUMPY_TYPES) + tuple(K_QUANTS)


def choose_type(t: gguf.MODEL_TENSOR, shape: tuple, qtype: Q) -> Q:
    """The type a tensor is written in: 1-D tensors and the router stay F32; a row length the block size
    does not divide falls back to F16 (as llama.cpp's converter does)."""
    if len(shape) == 1 or t in _KEEP_F32:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def encode_tensor(w: np.ndarray, qtype: Q) -> np.ndarray:
    """fp32 array -> the bytes (or F32/F16 array) gguf-py writes for `qtype`."""
    if qtype == Q.F32:
        return w.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w, qtype)  # uint8, byte-identical to ggml's reference quantizers


def _nbytes(shape: tuple, qtype: Q) -> tuple[tuple, int]:
    if qtype in (Q.F32, Q.F16):
        n = int(np.prod(shape)) * (4 if qtype == Q.F32 else 2)
        return shape, n
    bshape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return bshape, int(np.prod(bshape))


# ---- tokenizer ---------------------------------------------------------------------------------------
def add_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int):
    """Tokens, scores, types (and BPE merges for Tekken), special ids and the chat template."""
    from gguf.vocab import MistralVocab

    with tempfile.TemporaryDirectory() as d:  # MistralVocab reads a directory; give it only this file
        os.symlink(tok.path.resolve(), Path(d) / ("tekken.json" if tok.kind == "tekken" else "tokenizer.model"))
        vocab = MistralVocab(Path(d))
        tokens, scores, types = zip(*vocab.all_tokens())
        merges = vocab.extract_vocab_merges_from_model() if tok.kind == "tekken" else None
        ids = vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id
    tokens, scores, types = list(tokens), list(scores), list(types)
    if len(tokens) > vocab_size:
        raise ValueError(f"{tok.path} has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer: llama.cpp needs a token each
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.gguf_tokenizer_model)  # "llama" (SentencePiece) or "gpt2" (Tekken)
    writer.add_tokenizer_pre("tekken" if tok.kind == "tekken" else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(s) for s in scores])
    writer.add_token_types([int(t) for t in types])
    if merges is not None:
        writer.add_token_merges(merges)
    bos, eos, unk, pad = ids
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(gguf_chat_template(chat_format(tok)))


def add_hparams(writer: gguf.GGUFWriter, args: ModelArgs, name: str):
    writer.add_name(name)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_vocab_size(args.vocab_size)
    if args.is_moe:
        writer.add_expert_count(args.num_local_experts)
        writer.add_expert_used_count(args.num_experts_per_tok)


def window_warning(args: ModelArgs) -> str | None:
    w = args.sliding_window
    if w is not None and w < args.max_position_embeddings:
        return (f"the model uses a {w}-token sliding window but llama.cpp does not implement it: past {w} tokens "
                f"llama.cpp attends to the whole context (up to {args.max_position_embeddings}), so its outputs "
                f"differ from the model's. Keep prompts + generations within {w} tokens, or run with --ctx-size {w}.")
    return None


# ---- writing -----------------------------------------------------------------------------------------
def write_gguf(path: Path, model, args: ModelArgs, tok: Tokenizer, qtype: Q, file_type: int, name: str,
               progress: Progress | None = None) -> dict:
    """Stream the model's tensors into a GGUF at `path` (not atomic by itself); returns type counts."""
    params = dict(tree_flatten(model.parameters()))
    plan = []  # (ours, gguf name, tensor type, written type, numpy shape)
    for ours, w in params.items():
        if ours.endswith((".scales", ".biases")) or ".lora_" in ours:
            raise ValueError(f"{ours}: fuse and dequantize the model before writing GGUF")
        gname, t = gguf_name(ours)
        plan.append((ours, gname, t, choose_type(t, tuple(w.shape), qtype), tuple(w.shape)))
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_hparams(writer, args, name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tok, args.vocab_size)
    for _, gname, _, wtype, shape in plan:
        bshape, nbytes = _nbytes(shape, wtype)
        dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(wtype, np.uint8)
        writer.add_tensor_info(gname, bshape, np.dtype(dtype), nbytes, raw_dtype=None if dtype != np.uint8 else wtype)
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    for i, (ours, gname, t, wtype, shape) in enumerate(plan):
        if progress:
            progress(i, len(plan), gname)
        w = np.array(params[ours].astype(mx.float32), copy=False)
        heads = rope_heads(ours, args)
        if heads:
            w = to_interleaved(w, heads)
        writer.write_tensor_data(encode_tensor(w, wtype))
        counts[wtype.name] = counts.get(wtype.name, 0) + 1
    writer.close()
    if progress:
        progress(len(plan), len(plan), "done")
    return counts


_QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def _k_quantize(src: Path, dst: Path, file_type: int, n_threads: int | None = None):
    """llama.cpp's own quantizer, in a child process: a native library built for another CPU can crash, and
    a crash then becomes a clear error instead of taking the caller down (see the README's troubleshooting)."""
    import importlib.util
    import signal
    import subprocess
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("K-quants (q4_k_m, q5_k_m, q6_k) are made by llama.cpp's own quantizer: "
                         "pip install llama-cpp-python (or export f16 and run llama-quantize yourself)")
    cmd = [sys.executable, "-c", _QUANTIZE, str(src), str(dst), str(int(file_type)),
           str(n_threads or os.cpu_count() or 1)]
    rc = subprocess.run(cmd).returncode
    if rc < 0:
        raise ValueError(f"llama.cpp's quantizer crashed with {signal.Signals(-rc).name} on {src}: llama-cpp-python "
                         "may have been built for another CPU; see 'Troubleshooting' in the README")
    if rc != 0:
        raise ValueError(f"llama.cpp's quantizer failed on {src} (return code {rc}); see its log above")


def read_type_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def export_gguf(model_path, out, adapter=None, dtype: str = "f16", modelfile: bool = True,
                progress: Progress | None = None) -> dict:
    """Fuse, dequantize and write the model to one GGUF (+ an Ollama Modelfile beside it).

    Returns {"out", "dtype", "types" (tensor type -> count), "warnings": [...], "modelfile"}.
    """
    dtype = dtype.lower()
    if dtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {dtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output file name must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_fused(model_path, adapter)
    args, tok = loaded.args, loaded.tokenizer
    name = loaded.model_dir.name + (f"+{Path(adapter).name}" if adapter else "")
    warnings = [w for w in [window_warning(args)] if w]
    if dtype in NUMPY_TYPES:
        qtype, ftype = NUMPY_TYPES[dtype]
        with atomic_path(out) as tmp:
            types = write_gguf(tmp, loaded.model, args, tok, qtype, ftype, name, progress)
    else:
        ftype, fallback = K_QUANTS[dtype]
        odd = [n for n, w in tree_flatten(loaded.model.parameters()) if w.ndim > 1 and w.shape[-1] % 256]
        if odd:
            warnings.append(f"{len(odd)} tensors have rows not a multiple of 256 (e.g. {odd[0]}): llama.cpp "
                            f"quantizes them as {fallback} (F16 if not a multiple of 32) instead of a K-quant")
        # the intermediate holds the weights exactly: F32 when the model is fp32, else F16/BF16 as stored
        first = next(iter(dict(tree_flatten(loaded.model.parameters())).values()))
        inter = {"bfloat16": "bf16", "float16": "f16"}.get(str(first.dtype).split(".")[-1], "f32")
        qtype, inter_ftype = NUMPY_TYPES[inter]
        fd, tmp_src = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.",
                                       suffix=f".{inter}.gguf")
        os.close(fd)
        try:
            write_gguf(Path(tmp_src), loaded.model, args, tok, qtype, inter_ftype, name, progress)
            with atomic_path(out) as tmp:
                _k_quantize(Path(tmp_src), tmp, ftype)
        finally:
            os.unlink(tmp_src)
        types = read_type_counts(out)
    mf = write_modelfile(out, tok, min(args.max_position_embeddings, args.sliding_window or 1 << 62)) \
        if modelfile else None
    return {"out": str(out), "dtype": dtype, "types": types, "warnings": warnings,
            "modelfile": str(mf) if mf else None}


__all__ = ["export_gguf", "write_gguf", "GGUF_TYPES", "window_warning"]
