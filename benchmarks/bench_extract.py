"""Extract Eraser on full-size SD1.5 shapes: time, ranks, error and size of an ESD-x-shaped erasure.

The 64 cross-attention weights of an SD1.5 UNet (16 blocks x to_q, to_k, to_v, to_out.0 at widths
320/640/1280, text width 768) get a seeded synthetic difference: a rank-``--true-rank`` part plus
isotropic noise carrying ``--noise`` of the energy (fine-tuning differences are dominated by a
few directions; real ESD-x differences were not available offline). ``--full-rank`` replaces it
with pure noise, the worst case. No ComfyUI, no downloads.

    python benchmarks/bench_extract.py
    python benchmarks/bench_extract.py --full-rank --max-rank 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from erasure_core.edit.extract import extract_low_rank  # noqa: E402

WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def deltas(true_rank: int, noise: float, full_rank: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, d in enumerate(WIDTHS):
        for proj, d_in in (("to_q", d), ("to_k", 768), ("to_v", 768), ("to_out.0", d)):
            if full_rank:
                delta = torch.randn(d, d_in, generator=g)
            else:
                low = torch.randn(d, true_rank, generator=g) @ torch.randn(true_rank, d_in, generator=g)
                rand = torch.randn(d, d_in, generator=g)
                delta = low / low.norm() * (1 - noise) ** 0.5 + rand / rand.norm() * noise ** 0.5
            out[f"block{i}.attn2.{proj}.weight"] = delta * 1e-3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--true-rank", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.001, help="share of the energy in full-rank noise")
    parser.add_argument("--full-rank", action="store_true")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--max-error", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = deltas(args.true_rank, args.noise, args.full_rank)
    start = time.perf_counter()
    patch, report = extract_low_rank(data, max_rank=args.max_rank, max_error=args.max_error)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "e.safetensors")
        patch.save(path)
        size = os.path.getsize(path)
    case = "full-rank noise" if args.full_rank else f"rank {args.true_rank} + {args.noise:g} noise energy"
    print(f"| {case} | {len(data)} | {args.max_rank} | {args.max_error:g} | {seconds:.1f} | "
          f"{report.max_rank} | {report.max_error:.3f} | {report.dense_bytes / 2**20:.1f} | {size / 2**20:.2f} |")


if __name__ == "__main__":
    main()
