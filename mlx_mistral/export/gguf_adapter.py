"""An adapter-only GGUF: apply a fine-tune to a base GGUF the user already has, quantized or not
(`llama-cli -m base.gguf --lora adapter.gguf`).

llama.cpp scales each adapted tensor by `adapter.lora.alpha / r`, with r read from that tensor's B and
one alpha for the file; with alpha 0 it uses the user's scale alone (`--lora-scaled`, default 1). So when
every module has the same alpha we write it; when alphas differ (the `gqa` rank policy, PEFT
alpha_pattern) each module's alpha / r is folded into its B and alpha is written as 0.
Tensors: `blk.N.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r), F32, B's rows permuted like Q/K.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import safetensors.numpy

from ..core.adapters import read_adapters
from ..core.config import ModelArgs
from ..core.hub import resolve_path
from ..core.io import atomic_path
from ..core.weights import gguf_name, rope_heads, to_interleaved
from .weights import check_fingerprint


def export_gguf_lora(model_path, run_dir, out) -> dict:
    """Write the run directory's adapters as a llama.cpp LoRA GGUF for the base model at `model_path`
    (only its config is read). Returns {"out", "alpha", "folded", "tensors"}."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output file name must end in .gguf")
    args = ModelArgs.from_dir(resolve_path(model_path))
    cfg, _, weights = read_adapters(run_dir, safetensors.numpy.load_file)
    check_fingerprint(cfg, args, run_dir)
    modules = cfg["modules"]
    alphas = {float(m["alpha"]) for m in modules.values()}
    fold = len(alphas) != 1
    alpha = 0.0 if fold else alphas.pop()
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, m in modules.items():
        gname, _ = gguf_name(name + ".weight")
        a = np.array(weights[f"{name}.lora_a"].T, dtype=np.float32)  # (r, in)
        b = np.array(weights[f"{name}.lora_b"].T, dtype=np.float32)  # (out, r)
        heads = rope_heads(name, args)
        if heads:
            b = to_interleaved(b, heads)
        if fold:
            b = b * np.float32(m["alpha"] / m["rank"])
        writer.add_tensor(gname + ".lora_a", a)
        writer.add_tensor(gname + ".lora_b", b)
    with atomic_path(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "alpha": alpha, "folded": fold, "tensors": 2 * len(modules)}
