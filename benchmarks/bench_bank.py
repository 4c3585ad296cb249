"""Cost of the default preserve bank (issue #13) and of the check (issue #12), on full-size
SD1.5 shapes on the CPU: a full-size CLIP-L (12 layers, random weights, the real BPE vocabulary)
behind the on-disk encoding cache, and the 32 K/V sites of SD1.5. No ComfyUI, no downloads.

    python benchmarks/bench_bank.py [--repeats 3] [--method uce]

Rows: encoding the bank the first time (cache empty), reading it back (cache warm), the whole
erasure with and without the bank (cache warm), and the check that the node reports; the erase and
check rows forget remembered Grams before each run (``forget_grams``), so each times a first run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from timing import median_times  # noqa: E402

import erasure_core as ec  # noqa: E402
from erasure_core.edit.linalg import forget_grams  # noqa: E402
from erasure_core.methods.bank import bank_prompts, probe_prompts  # noqa: E402
from erasure_core.methods.check import check_edit  # noqa: E402
from erasure_core.methods.closed_form import preserve_list  # noqa: E402
from erasure_core.text.cache import CachedEncoder  # noqa: E402
from erasure_core.text.clip import BPETokenizer, ClipTextEncoder, find_merges_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--method", default="uce", choices=ec.methods.names(), help="method for the erase rows")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    clip = ClipTextEncoder(tokenizer=BPETokenizer(find_merges_file()), seed=0)
    gen = torch.Generator().manual_seed(0)
    sites = [ec.AttentionSite(k, torch.randn(shape, generator=gen) / shape[1] ** 0.5)
             for k, shape in ec.reference_site_shapes("sd1").items() if "attn2" in k]
    concepts = ec.ConceptSet.simple(("cat",), ("dog",))
    bank = bank_prompts(concepts, exclude=[""])
    keep = preserve_list(concepts, preserve_empty=True, bank=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cold = CachedEncoder(clip, folder, "bench")
        rows.append((f"bank, first run: encode {len(bank)} prompts (cache empty)", median_times(lambda: cold(bank), 1)))
        # a new encoder per run, as a node run makes one: the cache file is read and checked each time
        rows.append((f"bank, cached: read {len(bank)} prompts back",
                     median_times(lambda: CachedEncoder(clip, folder, "bench")(bank), args.repeats)))
        warm = CachedEncoder(clip, folder, "bench")
        warm(["cat", "dog", ""] + probe_prompts(concepts, keep))  # the rest of what the node encodes
        patches = {}
        for on in (False, True):
            config = ec.make_config(args.method, preserve_bank=on)

            def run(config=config, on=on):
                forget_grams()  # every repeat computes its Grams (the bank's key Gram is large enough to be remembered)
                patches[on] = ec.erase(args.method, sites, concepts, warm, config)

            rows.append((f"{args.method} erase, bank {'on' if on else 'off'} (encodings cached)",
                         median_times(run, args.repeats)))
        rows.append(("check: gap left, preserved and probe drift (32 sites)",
                     median_times(lambda: (forget_grams(), check_edit(sites, patches[True], concepts, warm, keep)),
                                  args.repeats)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD1.5 K/V shapes, CLIP-L 12 layers")
    print("| step | seconds | CPU seconds |\n| --- | ---: | ---: |")
    for name, (seconds, cpu) in rows:
        print(f"| {name} | {seconds:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
