"""Export time and peak memory for a ~125M-parameter Mistral to GGUF F16 and Q8_0 (and HF safetensors).

    python bench/bench_export.py --workdir /tmp/bench_export

Builds a random bf16 checkpoint (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32000,
the v1 tokenizer), then runs each export in a fresh process and reports its wall time and peak RSS
(VmHWM on Linux, `ru_maxrss` on macOS), so one export's memory does not hide another's. Timing on a shared machine is noisy:
`--repeats` runs each export several times and reports the median.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4, head_dim=64, sliding_window=4096,
              max_position_embeddings=32768)


def make_model(out: Path):
    import mlx_mistral.backends.mlx  # noqa: F401  (OpenBLAS before mlx.core)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_mistral.backends.mlx.loader import save_safetensors
    from mlx_mistral.backends.mlx.model import Model
    from mlx_mistral.core.config import ModelArgs
    from mlx_mistral.core.io import write_json
    from mlx_mistral.core.tokenizer import bundled_tokenizer_path

    args = ModelArgs(**CONFIG)
    model = Model(args)
    weights = {k: (v * 4).astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / "model.safetensors", weights, metadata={"format": "pt"})
    write_json(out / "config.json", args.to_hf_config())
    shutil.copy(bundled_tokenizer_path("tokenizer.model.v1"), out / "tokenizer.model")
    return args.param_count()


def one(kind: str, model_dir: str, out: str):
    """Run one export in this process and print {"seconds", "peak_rss"}."""
    import mlx_mistral.backends.mlx  # noqa: F401

    t = time.perf_counter()
    if kind == "imports":  # the floor: interpreter + mlx + the exporters' imports, no model
        import mlx_mistral.export.gguf_model  # noqa: F401
        import mlx_mistral.export.hf  # noqa: F401
    elif kind == "hf":
        from mlx_mistral.export.hf import export_hf

        export_hf(model_dir, out)
    else:
        from mlx_mistral.export.gguf_model import export_gguf

        export_gguf(model_dir, out, dtype=kind)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux: VmHWM (ru_maxrss would include the parent's
    peak, which survives exec); macOS: ru_maxrss (bytes there)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_export")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=3, metavar=("KIND", "MODEL", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(*a.one)
    work = Path(a.workdir)
    model_dir = work / "model"
    n = make_model(model_dir)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(f"model: {n / 1e6:.1f}M parameters, {size / 1e6:.0f} MB bf16 safetensors")
    for kind, out in (("imports", work / "none"), ("f16", work / "m-f16.gguf"), ("q8_0", work / "m-q8_0.gguf"), ("hf", work / "hf")):
        runs = []
        for _ in range(a.repeats):
            r = subprocess.run([sys.executable, __file__, "--one", kind, str(model_dir), str(out)],
                               check=True, capture_output=True, text=True)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        out_size = 0 if not out.exists() else out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.glob("*.safetensors"))
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
        print(f"{kind:5s} time median {statistics.median(r['seconds'] for r in runs):6.2f} s "
              f"(runs {times}), peak RSS "
              f"{max(r['peak_rss'] for r in runs) / 1e9:.2f} GB, output {out_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
