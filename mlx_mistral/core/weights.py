"""The one table of weight names, and the one RoPE permutation pair, for every loader and exporter.

One model, four namings of its tensors:
- **Hugging Face** (transformers' `MistralForCausalLM` / `MixtralForCausalLM`):
  `model.layers.N.self_attn.q_proj.weight`, ...; Mixtral's experts one tensor each,
  `model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight` (w1 gate, w2 down, w3 up).
- **ours** (the parameter names of both backends' models, also mlx-lm's): Hugging Face's, except that
  Mixtral's experts are stacked (E, out, in) as `block_sparse_moe.switch_mlp.gate_proj|up_proj|down_proj.weight`.
- **Mistral-native** (`params.json` + `consolidated.safetensors`): `layers.N.attention.wq.weight`, ...,
  with the q/k rows in the interleaved RoPE layout.
- **GGUF** (llama.cpp's `llama` architecture): gguf-py's `MODEL_TENSOR` names (`blk.N.attn_q.weight`, ...),
  q/k rows interleaved as well, experts stacked.

HF's RoPE rotates the two halves of each head (`rotate_half`); Meta, Mistral and llama.cpp rotate adjacent
pairs. `to_interleaved` / `from_interleaved` move q/k rows (per head, `n_kv_heads` for k) between the two.

Everything here works on numpy, MLX and torch arrays alike (`reshape`, `swapaxes`, indexing); the one
backend-specific operation, stacking experts, is passed in. Nothing here imports a backend.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from .config import ModelArgs
from .hub import is_mistral_native, weight_files
from .io import read_safetensors

# ---- ours <-> Hugging Face ----------------------------------------------------------------------------------
EXPERT_HF = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # our stacked name -> HF's per-expert name
_STACKED = re.compile(r"(model\.layers\.\d+\.block_sparse_moe)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight")


def hf_to_ours(weights: dict, args: ModelArgs, stack: Callable) -> dict:
    """HF tensor names -> ours: drop RoPE buffers and a tied head, stack Mixtral's experts with `stack`
    (`np.stack`, `mx.stack` or `torch.stack`). Names already ours pass unchanged."""
    out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    if args.is_moe:
        for layer in range(args.num_hidden_layers):
            pre = f"model.layers.{layer}.block_sparse_moe"
            for ours, hf in EXPERT_HF.items():
                names = [f"{pre}.experts.{e}.{hf}.weight" for e in range(args.num_local_experts)]
                if all(n in out for n in names):
                    out[f"{pre}.switch_mlp.{ours}.weight"] = stack([out.pop(n) for n in names])  # (E, out, in)
                elif any(n in out for n in names):
                    miss = [n for n in names if n not in out]
                    raise ValueError(f"checkpoint is missing expert tensors: {', '.join(miss[:4])}")
    return out


def ours_to_hf(weights: dict) -> dict:
    """Our names -> HF's: Mixtral's stacked experts split into `experts.E.w1|w2|w3` (each `w[e]`, (out, in))."""
    out = {}
    for name, w in weights.items():
        m = _STACKED.fullmatch(name)
        if m:
            for e in range(w.shape[0]):
                out[f"{m.group(1)}.experts.{e}.{EXPERT_HF[m.group(2)]}.weight"] = w[e]
        else:
            out[name] = w
    return out


# ---- Mistral-native -> Hugging Face --------------------------------------------------------------------------
MISTRAL_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
MISTRAL_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                 "feed_forward.w3": "mlp.up_proj", "feed_forward.gate": "block_sparse_moe.gate"}


def mistral_to_hf(weights: dict, args: ModelArgs) -> dict:
    """`consolidated.safetensors` tensors -> HF names, q/k rows from the interleaved RoPE layout to HF's."""
    out = {}
    for name, w in weights.items():
        if name in MISTRAL_TOP:
            out[MISTRAL_TOP[name]] = w
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
        if not m:
            raise ValueError(f"unexpected tensor {name!r} in a params.json checkpoint")
        i, rest = m.groups()
        e = re.fullmatch(r"feed_forward\.experts\.(\d+)\.(w[123])", rest)
        if e:
            new = f"block_sparse_moe.experts.{e.group(1)}.{e.group(2)}"
        elif rest in MISTRAL_LAYER:
            new = MISTRAL_LAYER[rest]
        else:
            raise ValueError(f"unexpected tensor {name!r} in a params.json checkpoint")
        hf = f"model.layers.{i}.{new}.weight"
        heads = rope_heads(hf, args)
        out[hf] = from_interleaved(w, heads) if heads else w
    return out


# ---- GGUF (llama.cpp) ----------------------------------------------------------------------------------------
# Our parameter names ({} = layer index, ".weight" implied) -> gguf-py's MODEL_TENSOR member.
GGUF_TENSORS = {
    "model.embed_tokens": "TOKEN_EMBD",
    "model.norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
    "model.layers.{}.input_layernorm": "ATTN_NORM",
    "model.layers.{}.self_attn.q_proj": "ATTN_Q",
    "model.layers.{}.self_attn.k_proj": "ATTN_K",
    "model.layers.{}.self_attn.v_proj": "ATTN_V",
    "model.layers.{}.self_attn.o_proj": "ATTN_OUT",
    "model.layers.{}.post_attention_layernorm": "FFN_NORM",
    "model.layers.{}.mlp.gate_proj": "FFN_GATE",
    "model.layers.{}.mlp.up_proj": "FFN_UP",
    "model.layers.{}.mlp.down_proj": "FFN_DOWN",
    "model.layers.{}.block_sparse_moe.gate": "FFN_GATE_INP",
    "model.layers.{}.block_sparse_moe.switch_mlp.gate_proj": "FFN_GATE_EXP",  # (E, ff, hidden)
    "model.layers.{}.block_sparse_moe.switch_mlp.up_proj": "FFN_UP_EXP",
    "model.layers.{}.block_sparse_moe.switch_mlp.down_proj": "FFN_DOWN_EXP",  # (E, hidden, ff)
}


def gguf_name(name: str):
    """`model.layers.3.self_attn.q_proj.weight` -> (`blk.3.attn_q.weight`, `gguf.MODEL_TENSOR.ATTN_Q`);
    ValueError for a tensor llama.cpp has no place for."""
    import gguf  # ~1 s to import: only exports pay it

    base = name.removesuffix(".weight")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    key, bid = (f"model.layers.{{}}.{m.group(2)}", int(m.group(1))) if m else (base, None)
    if key not in GGUF_TENSORS or not name.endswith(".weight"):
        raise ValueError(f"tensor {name!r} has no llama.cpp equivalent (known: "
                         f"{', '.join(k + '.weight' for k in GGUF_TENSORS)})")
    t = gguf.MODEL_TENSOR[GGUF_TENSORS[key]]
    return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight", t


# ---- RoPE layouts --------------------------------------------------------------------------------------------
def rope_heads(name: str, args: ModelArgs) -> int | None:
    """The heads a tensor's rows are grouped in for RoPE (q: n_heads, k: n_kv_heads), None for any other;
    `name` is ours or HF's (`...self_attn.q_proj.weight`, or a module name such as an adapter's)."""
    if re.search(r"\.self_attn\.q_proj(\.weight)?$", name):
        return args.num_attention_heads
    if re.search(r"\.self_attn\.k_proj(\.weight)?$", name):
        return args.num_key_value_heads
    return None


def _rope_rows(w, n_heads: int) -> int:
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot permute {rows} rows for RoPE over {n_heads} heads: not a multiple of 2 * heads")
    return rows // n_heads // 2


def to_interleaved(w, n_heads: int):
    """Rows of a q/k projection from HF's rotate-half layout to the interleaved one (llama.cpp, Mistral's
    own files), per head. Any array whose first axis is n_heads * head_dim (a LoRA B included)."""
    half = _rope_rows(w, n_heads)
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_interleaved(w, n_heads: int):
    """The inverse of `to_interleaved`: interleaved q/k rows -> HF's rotate-half layout."""
    half = _rope_rows(w, n_heads)
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- reading a checkpoint, checking it against a model -------------------------------------------------------
def checkpoint_weights(model_dir: Path, args: ModelArgs, read: Callable, stack: Callable) -> dict:
    """Every tensor of a model directory (see `hub.weight_files`) under our names: read file by file with
    `read` (a backend's safetensors reader), a Mistral-native checkpoint renamed and its q/k rows permuted,
    HF names mapped to ours (experts stacked with `stack`)."""
    weights = {}
    for f in weight_files(model_dir):
        weights.update(read_safetensors(f, read))
    if is_mistral_native(model_dir):
        weights = mistral_to_hf(weights, args)
    return hf_to_ours(weights, args, stack)


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], source: str):
    """Raise ValueError naming missing, unexpected or mis-shaped tensors (`name -> shape` on both sides)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        for what, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                parts.append(f"{what} {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        raise ValueError(f"{source} does not match the model config: " + "; ".join(parts))
    for k, shape in found.items():
        if tuple(shape) != tuple(expected[k]):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(shape)}, the config implies {tuple(expected[k])}")


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for a config, from the config alone (what both models hold)."""
    h, inter, E = args.hidden_size, args.intermediate_size, args.num_local_experts
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    out = {"model.embed_tokens.weight": (args.vocab_size, h)}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        if args.is_moe:
            moe = p + "block_sparse_moe."
            out.update({moe + "gate.weight": (E, h), moe + "switch_mlp.gate_proj.weight": (E, inter, h),
                        moe + "switch_mlp.up_proj.weight": (E, inter, h),
                        moe + "switch_mlp.down_proj.weight": (E, h, inter)})
        else:
            out.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                        p + "mlp.down_proj.weight": (h, inter)})
    out["model.norm.weight"] = (h,)
    if not args.tie_word_embeddings:
        out["lm_head.weight"] = (args.vocab_size, h)
    return out


# ---- dtypes ------------------------------------------------------------------------------------------------
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_name(dtype: str) -> str:
    """The canonical name of a dtype the user typed ("bf16" -> "bfloat16"); ValueError for another."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def storage_dtype(model_dir: str | Path) -> str | None:
    """The dtype a checkpoint's `config.json` (a model directory's, or the file itself) says its weights are
    stored in (`dtype`, transformers 5, or `torch_dtype`), as "float32" / "bfloat16" / "float16"; None when
    it names none we load."""
    p = Path(model_dir)
    p = p if p.is_file() else p / "config.json"
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    name = data.get("dtype") or data.get("torch_dtype")
    return DTYPES.get(str(name).removeprefix("torch.")) if name else None
