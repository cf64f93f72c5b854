"""`ModelArgs`: the one description of a Mistral-family model, for every backend and converter.

Read from a Hugging Face `config.json` (`MistralForCausalLM`, `MixtralForCausalLM`, Nemo's explicit
`head_dim`), from an MLX directory (the same plus `quantization`), or from Mistral's own `params.json`.
Every key is either implemented, known to be irrelevant to the forward pass (listed with the reason
in `_IGNORED_HF`), or rejected with a `ValueError` that names it: a feature is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# Keys that do not change what the model computes, with why we may skip them.
_IGNORED_HF = {
    "architectures": "checked against model_type",
    "model_type": "checked: mistral or mixtral",
    "_name_or_path": "provenance only",
    "transformers_version": "provenance only",
    "torch_dtype": "storage dtype; the load dtype is chosen by the caller",
    "dtype": "storage dtype; the load dtype is chosen by the caller",
    "initializer_range": "only used to initialise new weights",
    "use_cache": "generation always uses our KV cache",
    "pad_token_id": "the tokenizer owns special tokens",
    "bos_token_id": "read into ModelArgs, used by the exporters",
    "eos_token_id": "read into ModelArgs, used by the exporters",
    "max_position_embeddings": "read into ModelArgs; RoPE needs no table",
    "router_aux_loss_coef": "only used when output_router_logits is true (rejected)",
    "tokenizer_class": "the tokenizer is read from its own files",
}


def _reject(key: str, value, why: str):
    raise ValueError(f"config key {key!r} = {value!r} is not supported by mlx-mistral: {why}. "
                     "Remove it only if you know the checkpoint does not depend on it.")


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and hyper-parameters of a Mistral / Mixtral / Nemo model (HF field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    num_local_experts: int = 0  # 0: dense SwiGLU MLP; > 0: Mixtral sparse MoE
    num_experts_per_tok: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    quantization: dict | None = field(default=None, compare=False)  # {"group_size": 64, "bits": 4}

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"config key {name!r} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool)
                                                or self.sliding_window <= 0):
            raise ValueError(f"config key 'sliding_window' must be a positive integer or null, got "
                             f"{self.sliding_window!r} (per-layer window patterns are not supported)")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"1..num_local_experts ({self.num_local_experts})")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def model_type(self) -> str:
        return "mixtral" if self.is_moe else "mistral"

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    # ---- readers -------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a Hugging Face / MLX `config.json` dict; raises on anything we do not implement."""
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in ("mistral", "mixtral"):
            raise ValueError(f"config key 'model_type' = {model_type!r}: mlx-mistral supports 'mistral' "
                             "and 'mixtral' (Mistral 7B, Mistral-Nemo, Mixtral)")
        arch = cfg.get("architectures") or []
        expected = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[model_type]
        if arch and arch != [expected]:
            raise ValueError(f"config key 'architectures' = {arch!r}: expected [{expected!r}]")

        act = cfg.pop("hidden_act", "silu")
        if act not in ("silu", "swish"):
            _reject("hidden_act", act, "Mistral's MLP is SwiGLU with silu")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.pop(key, False):
                _reject(key, True, "Mistral's projections have no bias")
        for key in ("attention_dropout", "router_jitter_noise"):
            v = cfg.pop(key, 0.0)
            if v:
                _reject(key, v, "only 0.0 is implemented (use LoRA dropout for regularisation)")
        if cfg.pop("output_router_logits", False):
            _reject("output_router_logits", True, "the Mixtral router auxiliary loss is not implemented")

        theta = cfg.pop("rope_theta", None)
        rope_params = cfg.pop("rope_parameters", None)
        if rope_params is not None:
            rope_params = dict(rope_params)
            rtype = rope_params.pop("rope_type", rope_params.pop("type", "default"))
            if rtype != "default":
                _reject("rope_parameters.rope_type", rtype, "only the default RoPE is implemented")
            inner = rope_params.pop("rope_theta", None)
            if theta is not None and inner is not None and float(theta) != float(inner):
                raise ValueError(f"config has rope_theta={theta} and rope_parameters.rope_theta={inner}; "
                                 "they disagree, fix one")
            theta = inner if inner is not None else theta
            for k in list(rope_params):
                if k != "partial_rotary_factor" or rope_params[k] not in (1, 1.0):
                    _reject(f"rope_parameters.{k}", rope_params[k], "not part of the default RoPE")
        scaling = cfg.pop("rope_scaling", None)
        if scaling:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype != "default" or len(set(scaling) - {"rope_type", "type", "rope_theta"}):
                _reject("rope_scaling", scaling, "RoPE scaling (linear/dynamic/yarn/llama3) is not implemented")
            theta = scaling.get("rope_theta", theta)

        quant = cfg.pop("quantization", None)
        if "quantization_config" in cfg:
            _reject("quantization_config", cfg["quantization_config"],
                    "HF quantized checkpoints (bitsandbytes/GPTQ/AWQ) cannot be read; use the bf16/fp32 "
                    "checkpoint and --quantize 4|8")
        if quant is not None:
            quant = {"group_size": int(quant["group_size"]), "bits": int(quant["bits"])}

        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in cfg.items():
            if key in known:
                kwargs[key] = value
            elif key not in _IGNORED_HF:
                _reject(key, value, "unknown key")
        heads = kwargs.get("num_attention_heads")
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = kwargs["hidden_size"] // heads if heads else 0
        kwargs.setdefault("num_key_value_heads", heads)
        if model_type == "mixtral":
            if not kwargs.get("num_local_experts"):
                raise ValueError("a mixtral config needs 'num_local_experts' > 0")
        elif kwargs.get("num_local_experts"):
            _reject("num_local_experts", kwargs["num_local_experts"], "experts need model_type 'mixtral'")
        for opt in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(opt), list):
                kwargs[opt] = kwargs[opt][0]
            if kwargs.get(opt) is None:
                kwargs.pop(opt, None)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kwargs]
        if missing:
            raise ValueError(f"config is missing required keys: {', '.join(missing)}")
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        return cls(quantization=quant, **kwargs)

    @classmethod
    def from_mistral_params(cls, params: dict) -> "ModelArgs":
        """Build from Mistral's own `params.json` (the `consolidated.safetensors` format)."""
        p = dict(params)
        for key in ("vision_encoder", "lora", "quantization", "yarn", "rope_scaling"):
            if p.get(key):
                _reject(key, p[key], "not implemented for params.json checkpoints")
        if p.pop("use_biases", False):
            _reject("use_biases", True, "Mistral's projections have no bias")
        p.pop("max_batch_size", None)
        p.pop("model_type", None)
        moe = p.pop("moe", None) or {}
        window = p.pop("sliding_window", None)
        if isinstance(window, list):
            _reject("sliding_window", window, "per-layer window patterns are not implemented")
        mapping = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size",
                   "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
                   "norm_eps": "rms_norm_eps", "vocab_size": "vocab_size", "rope_theta": "rope_theta",
                   "head_dim": "head_dim", "max_seq_len": "max_position_embeddings",
                   "tied_embeddings": "tie_word_embeddings"}
        kwargs = {}
        for key, value in p.items():
            if key not in mapping:
                _reject(key, value, "unknown params.json key")
            kwargs[mapping[key]] = value
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        kwargs.setdefault("rope_theta", 10000.0)
        unknown_moe = set(moe) - {"num_experts", "num_experts_per_tok"}
        if unknown_moe:
            _reject("moe." + sorted(unknown_moe)[0], moe, "unknown MoE option")
        if moe:
            kwargs["num_local_experts"] = int(moe["num_experts"])
            kwargs["num_experts_per_tok"] = int(moe["num_experts_per_tok"])
        return cls(sliding_window=window, **kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArgs":
        """Read `config.json` (HF/MLX) or `params.json` (Mistral) from a model directory, or a json file."""
        path = Path(path)
        if path.is_file():
            data = _read_json(path)
            return cls.from_mistral_params(data) if "dim" in data else cls.from_hf_config(data)
        if (path / "config.json").exists():
            return cls.from_hf_config(_read_json(path / "config.json"))
        if (path / "params.json").exists():
            return cls.from_mistral_params(_read_json(path / "params.json"))
        raise ValueError(f"{path} has neither config.json nor params.json: not a model directory")

    # ---- writers -------------------------------------------------------------------------------
    def to_hf_config(self) -> dict:
        """A `config.json` dict that transformers (and mlx-lm) read back to the same model."""
        cfg = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # top level: what Hub checkpoints and mlx-lm read
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
        }
        if self.is_moe:
            cfg.update(num_local_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok,
                       output_router_logits=False, router_jitter_noise=0.0)
        if self.quantization:
            cfg["quantization"] = dict(self.quantization)
        return cfg

    def param_count(self) -> int:
        """Number of parameters of the unquantized model."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * i * (self.num_local_experts or 1) + (h * self.num_local_experts if self.is_moe else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * (attn + mlp + 2 * h) + emb + h


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


BUNDLED = Path(__file__).resolve().parents[1] / "configs"


def bundled_config(name: str) -> ModelArgs:
    """ModelArgs of a real checkpoint whose config.json ships with us (see `mlx_mistral/configs/`)."""
    p = BUNDLED / f"{name}.json"
    if not p.exists():
        names = ", ".join(sorted(x.stem for x in BUNDLED.glob("*.json")))
        raise ValueError(f"no bundled config {name!r}; bundled: {names}")
    return ModelArgs.from_hf_config(_read_json(p))
