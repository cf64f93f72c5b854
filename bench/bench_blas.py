"""MLX on Linux: the bundled reference BLAS vs OpenBLAS loaded by mlx_mistral (matmul and model forward).

    python bench/bench_blas.py [--repeats 3]

Each measurement runs in a fresh subprocess (the BLAS is bound at import), alternating the two
settings; medians are reported. The forward pass is the 9M-parameter demo model on (1, 256) tokens, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, tempfile
import mlx_mistral.backends.mlx
from mlx_mistral.backends._blas import STATUS
import mlx.core as mx
from mlx_mistral.core.tiny import build_tiny
from mlx_mistral import load

n = 1024
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a @ b)
t = time.perf_counter(); reps = 5
for _ in range(reps):
    mx.eval(a @ b)
gflops = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
with tempfile.TemporaryDirectory() as d:
    model, _ = load(build_tiny(d, "demo"))
    x = mx.random.randint(3, 32000, (1, 256))
    mx.eval(model(x))
    t = time.perf_counter(); reps = 3
    for _ in range(reps):
        mx.eval(model(x))
    tps = 256 * reps / (time.perf_counter() - t)
print(json.dumps({"blas": STATUS["loaded"] or "bundled", "gflops": gflops, "forward_tok_s": tps}))
"""


def run(blas: str) -> dict:
    env = dict(os.environ, MLX_MISTRAL_BLAS=blas) if blas else dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if not blas:
        env.pop("MLX_MISTRAL_BLAS", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res = {"bundled": [], "openblas": []}
    for _ in range(args.repeats):
        res["bundled"].append(run("none"))
        res["openblas"].append(run(""))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("gflops", "forward_tok_s")} for k, v in res.items()}
    print(f"{'setting':10s} {'matmul GFLOP/s':>15s} {'forward tok/s':>14s}   (fp32, medians of {args.repeats})")
    for k in ("bundled", "openblas"):
        print(f"{k:10s} {med[k]['gflops']:15.1f} {med[k]['forward_tok_s']:14.0f}   {res[k][0]['blas']}")
    print(f"ratio      {med['openblas']['gflops'] / med['bundled']['gflops']:15.1f}x"
          f" {med['openblas']['forward_tok_s'] / med['bundled']['forward_tok_s']:13.1f}x")


if __name__ == "__main__":
    main()
