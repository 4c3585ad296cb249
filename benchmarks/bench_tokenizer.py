"""The CLIP BPE on one long word: the heap merge (erasure_core.text.clip) against the textbook loop
it replaced, per word length (issue #14: one long word in Load Concepts' targets blocked ComfyUI's
HTTP handler, since queue-time checks tokenise). Needs CLIP's merges file (open-clip-torch).

    python benchmarks/bench_tokenizer.py
    python benchmarks/bench_tokenizer.py --lengths 1000,10000 --textbook-max 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from erasure_core.text.clip import BPETokenizer  # noqa: E402


def textbook(tokenizer: BPETokenizer, word: str) -> list[str]:
    """The loop every CLIP port ships: rescan all pairs after each merge, O(n²) per word."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(tokenizer.ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1000,2000,4000,16000,100000")
    parser.add_argument("--textbook-max", type=int, default=4000, help="longest word given to the O(n²) loop")
    args = parser.parse_args()
    tokenizer = BPETokenizer()
    print("| word length | heap BPE (s) | textbook BPE (s) | same tokens |")
    print("| ---: | ---: | ---: | :---: |")
    for n in (int(x) for x in args.lengths.split(",")):
        word = ("vangogh" * (n // 7 + 1))[:n]
        tokenizer._cache.clear()
        started = time.perf_counter()
        fast = tokenizer._bpe(word)
        heap_s = time.perf_counter() - started
        if n <= args.textbook_max:
            started = time.perf_counter()
            same = "yes" if textbook(tokenizer, word) == fast else "NO"
            slow = f"{time.perf_counter() - started:.3f}"
        else:
            slow, same = "(skipped)", "-"
        print(f"| {n:,} | {heap_s:.3f} | {slow} | {same} |")


if __name__ == "__main__":
    main()
