"""Time of Apply SPM's core work on full-size SD1.5 shapes: reading SPM files, the FT gate, and
combining membranes (paper and reference-code), on the CPU. No ComfyUI, no downloads.

    python benchmarks/bench_spm.py [--spms 3] [--repeats 5]

It writes seeded SPMs in the released layout (16 transformers x 12 modules, rank 1, fp16, with
``prompts``/``rank``/``alpha`` metadata) to a temporary folder, then reports the median wall time
of each step. The CLIP encoding of the prompt and concepts (one batched call into the user's CLIP
inside ComfyUI) is not included: it is the same cost as one CLIP Text Encode of that many prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import median_times  # noqa: E402

from erasure_core.formats.spm import load_spm_file  # noqa: E402
from erasure_core.gating.ft_gate import ft_gate  # noqa: E402
from erasure_core.gating.spm_combine import PAPER, REFERENCE, combine  # noqa: E402

# (diffusers block, width) of SD1.5's 16 transformers
BLOCKS = [(f"down_blocks_{b}_attentions_{a}", w) for b, w in ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)] \
    + [("mid_block_attentions_0", 1280)] \
    + [(f"up_blocks_{b}_attentions_{a}", w) for b, w in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]


def module_shapes() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """kohya module name -> (down shape, up shape) for rank 1."""
    out = {}
    for block, c in BLOCKS:
        t = f"lora_unet_{block}_transformer_blocks_0"
        out[f"lora_unet_{block}_proj_in"] = ((1, c, 1, 1), (c, 1, 1, 1))
        out[f"lora_unet_{block}_proj_out"] = ((1, c, 1, 1), (c, 1, 1, 1))
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                d_in = 768 if attn == "attn2" and proj in ("to_k", "to_v") else c
                out[f"{t}_{attn}_{proj}"] = ((1, d_in), (c, 1))
        out[f"{t}_ff_net_0_proj"] = ((1, c), (8 * c, 1))
        out[f"{t}_ff_net_2"] = ((1, 4 * c), (c, 1))
    return out


def write_spm(path: str, seed: int, prompts: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (down, up) in module_shapes().items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(down, generator=gen).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(up, generator=gen) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(1.0).half()
    save_file(tensors, path, {"prompts": prompts, "rank": "1", "alpha": "1.0"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spms", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"spm{i}.safetensors") for i in range(args.spms)]
        for i, path in enumerate(paths):
            write_spm(path, i, f"concept {i}, concept {i} style")
        size_mb = os.path.getsize(paths[0]) / 2**20
        spms = [load_spm_file(p) for p in paths]
        load = median_times(lambda: [load_spm_file(p) for p in paths], args.repeats)[0]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(77, 768, generator=gen)
    targets = torch.randn(2, 77, 768, generator=gen)
    ids, target_ids = list(range(77)), [list(range(5)), list(range(3, 9))]
    gate = median_times(lambda: [ft_gate(prompt, ids, targets, target_ids, {49406, 49407}) for _ in spms], args.repeats)[0]
    multipliers = [0.8] * len(spms)
    paper = median_times(lambda: combine(spms, multipliers, PAPER), args.repeats)[0]
    reference = median_times(lambda: combine(spms, multipliers, REFERENCE), args.repeats)[0]
    print(f"SD1.5-shaped SPM: {len(module_shapes())} modules, {size_mb:.2f} MB per file; {args.spms} SPMs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| step | median s |\n| --- | --- |")
    for name, value in (("read files", load), ("FT gates (2 concepts each)", gate),
                        ("combine, paper", paper), ("combine, reference code", reference)):
        print(f"| {name} | {value:.4f} |")


if __name__ == "__main__":
    main()
