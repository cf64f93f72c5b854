"""Packing and mask-building time for 10k documents, and packing efficiency against padding.

    python bench/bench_packing.py                  # 10k log-normal documents (median 300), seq_len 2048
    python bench/bench_packing.py --docs 10000 --seq-len 4096 --median 600

Documents are synthetic token arrays with log-normal lengths; timings are medians of --repeat runs.
Mask building is `masks.packed_mask` + `masks.positions_from_segments` in MLX for one training batch
(what the model does once per step), timed on the default device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx_mistral.backends.mlx  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlx_mistral.backends.mlx.model import packed_mask, positions_from_segments
from mlx_mistral.core.packing import pack


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--median", type=float, default=300, help="median document length (tokens)")
    ap.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the lengths")
    ap.add_argument("--batch", type=int, default=4, help="rows per step for the mask timing")
    ap.add_argument("--window", type=int, default=4096, help="sliding window for the mask timing")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    lengths = np.maximum(2, rng.lognormal(np.log(args.median), args.sigma, args.docs).astype(int))
    docs = [rng.integers(3, 32000, size=n, dtype=np.int32) for n in lengths]
    print(f"{args.docs} documents, {int(lengths.sum()):,} tokens, median {int(np.median(lengths))}, "
          f"max {lengths.max()}; seq_len {args.seq_len}; mlx {mx.__version__} on {mx.default_device()}")
    print(f"{'mode':<8}{'pack time':>12}{'rows':>9}{'efficiency':>12}{'split docs':>12}")
    results = {}
    for mode in ("swa", "naive", "none"):
        t = median_time(lambda: pack(docs, args.seq_len, mode=mode), args.repeat)
        p = pack(docs, args.seq_len, mode=mode)
        results[mode] = p
        print(f"{mode:<8}{t * 1e3:>10.0f}ms{p.rows:>9,}{100 * p.efficiency:>11.1f}%{p.n_split:>12,}")
    swa, none = results["swa"], results["none"]
    print(f"packing (swa) needs {swa.rows / none.rows:.3f}x the rows of padding "
          f"({none.rows / swa.rows:.1f}x fewer steps for the same tokens)")

    seg = mx.array(swa.segment_ids[:args.batch])  # (B, L)

    def build():
        mx.eval(packed_mask(seg, args.window), positions_from_segments(seg))

    build()  # warm-up
    t = median_time(build, args.repeat * 4)
    L = args.seq_len
    print(f"mask + positions for one step ({args.batch} x {L}, window {args.window}): {t * 1e3:.2f} ms "
          f"({args.batch * L * L / 1e6:.1f}M mask entries); per epoch of {swa.rows} rows: "
          f"{t * swa.rows / args.batch:.2f} s")


if __name__ == "__main__":
    main()
