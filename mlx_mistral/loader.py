"""Load a model and its tokenizer from a local directory or a Hugging Face repo id.

Directory formats read: Hugging Face (`config.json` + `model*.safetensors`, sharded with an index), MLX
(the same with `quantization` in the config and `.scales`/`.biases` tensors, as mlx-lm writes), and
Mistral's own (`params.json` + `consolidated.safetensors`, whose q/k rows are in the interleaved RoPE
layout and get permuted to HF's on import). Loading is lazy (`mx.load` maps tensors on demand) and
strict: missing or unexpected tensors are an error that lists them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .model import Model
from .tokenizer import load_tokenizer

_DTYPES = {"float32": mx.float32, "fp32": mx.float32, "float16": mx.float16, "fp16": mx.float16,
           "bfloat16": mx.bfloat16, "bf16": mx.bfloat16}


def resolve_dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_path(path_or_repo: str | Path) -> Path:
    """A local directory as is; otherwise a Hub repo id fetched with `snapshot_download`
    (which honours `HF_HUB_OFFLINE` and the local cache)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{p} is a file; pass the model directory")
        return p
    s = str(path_or_repo)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise ValueError(f"{s} is neither an existing directory nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer.model*",
                                                          "tekken.json"]))
    except Exception as e:  # network, auth, offline cache miss: say what was tried
        raise ValueError(f"could not fetch {s!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                         "Check the id, your token (huggingface-cli login) or HF_HUB_OFFLINE.") from None


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise ValueError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("consolidated*.safetensors"))
    if not files:
        files = sorted(p for p in model_dir.glob("*.safetensors") if p.name != "adapters.safetensors")
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors weights (pickled .bin/.pt checkpoints are "
                         "not read: they can run code). Convert them to safetensors first.")
    return files


def load_safetensors(path: Path) -> dict:
    """`mx.load` with a clear error for truncated or corrupt files."""
    try:
        return mx.load(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e} (is the file truncated or not safetensors?)") from None


def read_weights(model_dir: Path) -> dict:
    weights = {}
    for f in weight_files(model_dir):
        weights.update(load_safetensors(f))
    return weights


# ---- Mistral's own format ---------------------------------------------------------------------------
def _unpermute_rope(w: mx.array, n_heads: int) -> mx.array:
    """Interleaved RoPE rows (Mistral/Meta) -> HF's half-split rows, per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def mistral_to_hf_weights(weights: dict, args: ModelArgs) -> dict:
    """Rename `consolidated.safetensors` tensors to HF names and permute q/k to the HF RoPE layout."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "feed_forward.gate": "block_sparse_moe.gate"}
    out = {}
    for name, w in weights.items():
        if name in top:
            out[top[name]] = w
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
        if not m:
            raise ValueError(f"unexpected tensor {name!r} in a params.json checkpoint")
        i, rest = m.groups()
        e = re.fullmatch(r"feed_forward\.experts\.(\d+)\.(w[123])", rest)
        if e:
            new = f"block_sparse_moe.experts.{e.group(1)}.{e.group(2)}"
        elif rest in layer:
            new = layer[rest]
        else:
            raise ValueError(f"unexpected tensor {name!r} in a params.json checkpoint")
        if rest == "attention.wq":
            w = _unpermute_rope(w, args.num_attention_heads)
        elif rest == "attention.wk":
            w = _unpermute_rope(w, args.num_key_value_heads)
        out[f"model.layers.{i}.{new}.weight"] = w
    return out


# ---- building -----------------------------------------------------------------------------------------
def load_weights_strict(model: nn.Module, weights: dict, source: str = "checkpoint"):
    """Load `weights` into `model`, raising on missing, unexpected or mis-shaped tensors."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"{source} does not match the model config: " + "; ".join(parts))
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config implies "
                             f"{tuple(expected[k].shape)}")
    model.load_weights(list(weights.items()), strict=False)


def quantize_model(model: Model, group_size: int = 64, bits: int = 4, only: set | None = None):
    """Quantize linear layers (not norms); `only` restricts to modules whose `.scales` are listed."""
    def pred(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if only is not None:
            return f"{path}.scales" in only
        w = getattr(module, "weight", None)
        return w is not None and w.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pred)


def load_model(model_dir: str | Path, dtype=None, lazy: bool = True) -> Model:
    """Build the model of a local directory and load its weights (see module doc for formats)."""
    model_dir = Path(model_dir)
    args = ModelArgs.from_dir(model_dir)
    model = Model(args)
    weights = read_weights(model_dir)
    if (model_dir / "params.json").exists() and not (model_dir / "config.json").exists():
        weights = mistral_to_hf_weights(weights, args)
    weights = model.sanitize(weights)
    if args.quantization:
        quantize_model(model, args.quantization["group_size"], args.quantization["bits"],
                       only={k for k in weights if k.endswith(".scales")})
    dt = resolve_dtype(dtype)
    if dt is not None:
        weights = {k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_weights_strict(model, weights, str(model_dir))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_repo: str | Path, dtype=None, backend: str = "mlx", lazy: bool = True):
    """`(model, tokenizer)` from a local directory or a Hub repo id.

    `dtype` casts floating weights ("float32", "bfloat16", "float16"; default: as stored).
    """
    if backend == "torch":
        from .torch_model import load as load_torch

        return load_torch(path_or_repo, dtype=dtype)
    if backend != "mlx":
        raise ValueError(f"unknown backend {backend!r}; use backend='mlx' or 'torch'")
    model_dir = resolve_path(path_or_repo)
    model = load_model(model_dir, dtype=dtype, lazy=lazy)
    tok = load_tokenizer(model_dir)
    if tok.vocab_size > model.args.vocab_size:  # ids past the embedding would read out of bounds
        raise ValueError(f"{model_dir}: the tokenizer ({tok.path.name}) has {tok.vocab_size} tokens but the "
                         f"model's vocab_size is {model.args.vocab_size}; they belong to different models")
    return model, tok
