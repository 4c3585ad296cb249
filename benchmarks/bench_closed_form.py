"""Time and memory of the closed-form methods on full-size model shapes (no ComfyUI, no downloads).

SD1.5 table: the 32 cross-attention K/V sites of a full-size SD1.5 UNet with seeded random
weights, and a full CLIP ViT-L/14 text encoder with seeded random weights and the real BPE
tokenizer. Each case runs ``erasure_core.erase(method, sites, concepts, encoder, config)`` in a
fresh subprocess, so its peak memory is its own. ``--sdxl`` adds the 140 SDXL K/V sites (width
2048), edit only: the encodings are given (random, built before the clock starts).

``--dit`` adds full-size DiT text projections (Flux-dev ``txt_in`` 3072×4096 + ``vector_in`` 3072×768,
SD3.5-large ``context_embedder`` 2432×4096 + ``y_embedder`` 2432×2048, Qwen-Image ``txt_in`` 3072×3584 behind
its RMSNorm), edit only, with the reference's last-subject pick (UCE-Flux) and SPEED: the encodings are given
as each prompt's own rows through its end token (at most 8; a one-row pick reads nothing else) plus a
pooled vector. ``--t5-estimate`` times one full-size T5-XXL encoder block on 100 prompts × 256 tokens and
extrapolates to the 24 blocks (the whole random T5-XXL does not fit here: see benchmarks/README.md).

Run ``python benchmarks/bench_closed_form.py --help``; benchmarks/README.md explains the columns.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import erasure_core as ec  # noqa: E402
from erasure_core.concept_text import normalise  # noqa: E402
from erasure_core.edit.linalg import forget_grams  # noqa: E402
from erasure_core.methods.closed_form import preserve_list  # noqa: E402
from erasure_core.text.clip import BPETokenizer, ClipTextEncoder, find_merges_file  # noqa: E402
from erasure_core.text.encoded import EncodedText, TokenPick  # noqa: E402

ANCHOR = "a painter"

# -- synthetic concept names ------------------------------------------------------------------
# Artist-like names from first names, surname syllables and particles: deterministic, unique,
# and of varied length (2 to 6 CLIP tokens, checked with the tokenizer).
_FIRST = ("anna", "marco", "yuki", "olaf", "ines", "tomas", "leila", "pavel", "greta", "kenji", "sofia",
          "ruben", "amara", "lucas", "nadia", "felix", "hana", "omar", "clara", "ivan", "mei", "diego",
          "elsa", "arjun", "zofia", "hugo", "lena", "rafael", "asha", "milo")
_SYLLABLES = ("ber", "ko", "vin", "dal", "mar", "ston", "el", "ova", "rin", "tash", "gu", "lind", "ami",
              "sor", "quist", "hal", "ne", "vey", "bro", "tz", "ard", "mi", "lo", "wick", "zan", "per",
              "ous", "cha")
_PARTICLES = ("van", "de", "von", "da", "le", "al")
_INITIALS = "ABCDEFGHJKLMNPRSTW"


def _candidate(rng: random.Random) -> str:
    first = rng.choice(_FIRST).capitalize()
    last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))).capitalize()
    r = rng.random()
    if r < 0.15:
        return f"{first} {rng.choice(_PARTICLES)} {last}"
    if r < 0.25:
        return f"{first} {rng.choice(_INITIALS)}. {last}"
    if r < 0.35:
        return last
    return f"{first} {last}"


def concept_names(tokenizer: BPETokenizer, n_targets: int, n_preserve: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n_targets`` target names and ``n_preserve`` disjoint preserve names, each 2-6 tokens.

    One deterministic stream, dealt alternately, so the first k targets are the same for every
    ``n_targets >= k`` and the preserve set does not depend on the number of targets.
    """
    rng = random.Random(seed)
    seen: set[str] = {normalise(ANCHOR)}
    targets: list[str] = []
    preserve: list[str] = []
    turn = 0
    while len(targets) < n_targets or len(preserve) < n_preserve:
        name = _candidate(rng)
        if normalise(name) in seen or not 2 <= len(tokenizer.ids(name)) <= 6:
            continue
        seen.add(normalise(name))
        (targets if turn % 2 == 0 else preserve).append(name)
        turn += 1
    return targets[:n_targets], preserve[:n_preserve]


# -- models -----------------------------------------------------------------------------------
def model_sites(arch: str, seed: int, device: str = "cpu") -> list[ec.AttentionSite]:
    """Every cross-attention K/V site of the full-size ``arch``, seeded, scaled 1/sqrt(d_in)."""
    gen = torch.Generator().manual_seed(seed)
    return [ec.AttentionSite(k, (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(device))
            for k, shape in ec.reference_site_shapes(arch).items() if "attn2" in k]


def _sync(device: str) -> None:
    """Wait for queued GPU work, so that a clock read after it is true."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TimedEncoder:
    """Calls the CLIP with the rows the method asks for (or ``forced`` rows) and adds up the
    seconds spent inside it; ``modes`` records each rows mode used and its longest width."""

    accepts_rows = True
    accepts_last_word = True

    def __init__(self, clip: ClipTextEncoder, forced: str | None = None):
        self.clip, self.forced = clip, forced
        self.reset()

    def reset(self) -> None:
        self.seconds, self.prompts, self.length = 0.0, 0, 0
        self.modes: dict[str, int] = {}

    def _record(self, rows: str, out: EncodedText, started: float, n: int) -> EncodedText:
        _sync(str(out.hidden.device))
        self.seconds += time.perf_counter() - started
        self.prompts += n
        self.length = max(self.length, int(out.hidden.shape[1]))
        self.modes[rows] = max(self.modes.get(rows, 0), int(out.hidden.shape[1]))
        return out

    def __call__(self, texts: Sequence[str], rows: str = "all") -> EncodedText:
        t0 = time.perf_counter()
        rows = self.forced or rows
        return self._record(rows, self.clip(texts, rows=rows), t0, len(texts))


class GivenEncoder(TimedEncoder):
    """Encodings built before the clock starts (SDXL section): random ``[N, 77, width]`` rows with
    one shared start-token row and each prompt's EOT where the real tokenizer puts it.

    ``expected`` lists the prompt lists the methods will ask for (in their order); any other
    request is built on the spot, and that time is counted as encode time."""

    def __init__(self, tokenizer: BPETokenizer, expected: Sequence[Sequence[str]], width: int, seed: int):
        self.tokenizer, self.width = tokenizer, width
        self.gen = torch.Generator().manual_seed(seed)
        self.given = {tuple(texts): self._build(texts) for texts in expected}
        self.forced = "given"
        self.reset()

    def _build(self, texts: Sequence[str]) -> EncodedText:
        ids, eot = self.tokenizer(texts)
        hidden = torch.randn(len(texts), self.tokenizer.context_length, self.width, generator=self.gen)
        hidden[:, 0] = hidden[0, 0].clone()  # the start token's row is the same for every prompt (causal)
        return EncodedText(tuple(texts), hidden, eot, token_ids=ids)

    def __call__(self, texts: Sequence[str], rows: str = "all") -> EncodedText:
        t0 = time.perf_counter()
        return self._record("given", self.given.get(tuple(texts)) or self._build(texts), t0, len(texts))


class DitGivenEncoder(GivenEncoder):
    """Given DiT encodings: a T5-like encoder's rows of each prompt through its end token (no start
    token: the end sits at the prompt's token count, from the CLIP tokenizer as a stand-in), and a
    pooled vector when the model reads one."""

    LENGTH = 8

    def __init__(self, tokenizer: BPETokenizer, expected: Sequence[Sequence[str]], width: int, pooled: int,
                 seed: int):
        self.pooled_width = pooled
        super().__init__(tokenizer, expected, width, seed)

    def _build(self, texts: Sequence[str]) -> EncodedText:
        eot = torch.tensor([min(len(self.tokenizer.ids(t)), self.LENGTH - 1) for t in texts], dtype=torch.long)
        hidden = torch.randn(len(texts), self.LENGTH, self.width, generator=self.gen)
        pooled = torch.randn(len(texts), self.pooled_width, generator=self.gen) if self.pooled_width else None
        return EncodedText(tuple(texts), hidden, eot, pooled=pooled)


def dit_sites(arch: str, seed: int) -> list[ec.AttentionSite]:
    """The text inputs of the full-size DiT ``arch`` (as ``detect`` reads them), seeded; a row norm gets
    a random scale around 1."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ec.reference_site_shapes(arch)
    spec = ec.detect(shapes)
    sites = []
    for key, inp, stream in spec.site_streams(shapes):
        weight = torch.randn(shapes[key], generator=gen) / shapes[key][1] ** 0.5
        transform = None
        if inp.norm is not None:
            scale = 1 + 0.1 * torch.randn(shapes[key][1], generator=gen)
            transform = ec.RowTransform(spec.norm_key(shapes, inp.norm), inp.norm.eps, scale)
        sites.append(ec.AttentionSite(key, weight, stream, transform))
    return sites


DIT_ARCHS = {"flux": "Flux-dev", "sd35_large": "SD3.5-large", "qwen_image": "Qwen-Image"}



def expected_prompts(concepts: ec.ConceptSet, config: Any = None) -> list[list[str]]:
    """The prompt lists UCE and SPEED encode: erase pairs, preserve prompts and the empty prompt
    (UCE); the same without the empty prompt, then the empty prompt alone (SPEED); each with the
    default preserve bank where ``config`` turns it on (else the lists are built on the clock)."""
    pairs = [p for pair in concepts.erase_pairs() for p in pair]
    bank = bool(getattr(config, "preserve_bank", False))
    return [list(dict.fromkeys(pairs + preserve_list(concepts, preserve_empty=True, bank=bank))),
            list(dict.fromkeys(pairs + preserve_list(concepts, preserve_empty=False, bank=bank))), [""]]


# -- what runs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    key: str  # what --methods matches (also the label)
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    rows: str | None = None  # forced encoder rows; None: decide from the token pick (and the probe)

    def config(self) -> Any:
        return ec.make_config(self.method, **self.options)


def variants(compare_rows: bool) -> list[Variant]:
    out: list[Variant] = []
    for name in ec.methods.names():
        out.append(Variant(name, name, name))
        if name == "speed":
            out.append(Variant("speed-multi", "speed (multi-celebrity)", "speed", {"preset": "multi-celebrity"}))
        if name == "uce":
            last = {"token_pick": TokenPick.LAST_SUBJECT}
            out.append(Variant("uce-last", "uce (last subject)", "uce", last))
            if compare_rows:
                out.append(Variant("uce-last-all", "uce (last subject, all rows)", "uce", last, rows="all"))
    return out


def select(all_variants: list[Variant], wanted: str | None) -> list[Variant]:
    if not wanted:
        return all_variants
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    known = {v.key for v in all_variants} | {v.label for v in all_variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {[v.key for v in all_variants]}")
    return [v for v in all_variants if v.key in names or v.label in names]


# -- one case, in its own process -------------------------------------------------------------
def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that set-up garbage is not counted."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> str:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; say how peaks are read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def _peak_kib(how: str) -> int:
    if how == "VmHWM":
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, since the start


def _current_kib() -> int:
    try:
        return _status_kib("VmRSS")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


WARMUP = ec.ConceptSet.simple(("Warmup Artist",), (ANCHOR,), ("Other Artist",))


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    variant = Variant(**case["variant"])
    tokenizer = BPETokenizer(case["merges"])
    targets, preserve = concept_names(tokenizer, case["targets"], case["preserve"], case["seed"])
    concepts = ec.ConceptSet.simple(targets, (ANCHOR,), preserve)
    config = variant.config()
    device = case.get("device", "cpu")
    dit = case["arch"] in DIT_ARCHS
    sites = dit_sites(case["arch"], case["seed"]) if dit else model_sites(case["arch"], case["seed"], device)
    if dit:
        token = next(s for s in sites if s.stream == "tokens")
        pooled = next((s.in_features for s in sites if s.stream == "pooled"), 0)
        encoder = DitGivenEncoder(tokenizer, expected_prompts(concepts, config) + expected_prompts(WARMUP, config),
                                  token.in_features, pooled, case["seed"])
    elif case["rows"] != "given":
        encoder: TimedEncoder = TimedEncoder(ClipTextEncoder(tokenizer=tokenizer, seed=case["seed"]).to(device),
                                             case["rows"])
    else:
        encoder = GivenEncoder(tokenizer, expected_prompts(concepts, config) + expected_prompts(WARMUP, config),
                               sites[0].in_features, case["seed"])
    if case["warmup"]:  # library start-up off the clock (measured: under 0.1 s on CPU, so off by default)
        ec.erase(variant.method, sites, WARMUP, encoder, config)
    _trim_heap()
    how = _reset_peak()
    base = _current_kib()
    runs: list[tuple[float, float, float]] = []
    rank = prompts_encoded = length = 0
    modes: dict[str, int] = {}
    patch_mib = 0.0
    for _ in range(case["repeats"]):
        encoder.reset()
        forget_grams()  # every repeat a first run: no Gram remembered from the last (linalg.gram)
        _trim_heap()
        cpu0, t0 = time.process_time(), time.perf_counter()
        patch = ec.erase(variant.method, sites, concepts, encoder, config)
        _sync(device)  # (the patch is copied to the CPU, which waits anyway)
        total = time.perf_counter() - t0
        runs.append((encoder.seconds, total, (time.process_time() - cpu0) / total))
        rank, patch_mib = patch.max_rank, patch.nbytes / 2**20
        prompts_encoded, length, modes = encoder.prompts, encoder.length, dict(encoder.modes)
        del patch
    peak = _peak_kib(how)
    return {
        "encode": statistics.median(e for e, _, _ in runs),
        "solve": statistics.median(t - e for e, t, _ in runs),
        "total": statistics.median(t for _, t, _ in runs),
        "cores": statistics.median(c for _, _, c in runs),
        "peak_mib": peak / 1024,
        "delta_mib": max(0, peak - base) / 1024,
        "peak_how": how,
        "rank": rank,
        "patch_mib": patch_mib,
        "prompts": prompts_encoded,
        "length": length,
        "modes": modes,
        "threads": torch.get_num_threads(),
    }


def run_in_subprocess(case: dict[str, Any], timeout: float | None, stable_memory: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)]
    env = dict(os.environ)
    if stable_memory:  # fixed glibc mmap threshold: big tensors are unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


# -- table ------------------------------------------------------------------------------------
COLUMNS = ("method", "rows", "targets", "preserved", "prompts", "encode s", "solve s", "total s",
           "cores", "peak RSS MiB", "+RSS MiB", "rank", "patch MiB")


def _row(case: dict[str, Any], result: dict[str, Any]) -> str:
    head = [case["variant"]["label"]]
    if "error" in result:
        cells = head + ["-", str(case["targets"]), str(case["preserve"])] + [result["error"]] + [""] * 8
    else:
        rows = "given" if case["rows"] == "given" else " + ".join(f"{m} ({n})" for m, n in result["modes"].items())
        cells = head + [rows, str(case["targets"]), str(case["preserve"]), str(result["prompts"]),
                        f"{result['encode']:.2f}", f"{result['solve']:.2f}", f"{result['total']:.2f}", f"{result['cores']:.1f}",
                        f"{result['peak_mib']:.0f}", f"{result['delta_mib']:.0f}", str(result["rank"]),
                        f"{result['patch_mib']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def _header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(COLUMNS))) + "|"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine()


def run_section(title: str, arch: str, chosen: list[Variant], rows_for: dict[str, str | None],
                args: argparse.Namespace, merges: str) -> None:
    print(f"\n### {title}\n")
    print(_header(), flush=True)
    started, load, hows = time.perf_counter(), os.getloadavg()[0], set()
    for v in chosen:
        for n_targets in args.targets:
            for n_preserve in args.preserve:
                case = {"variant": asdict(v), "arch": arch, "rows": rows_for[v.key], "targets": n_targets,
                        "preserve": n_preserve, "repeats": args.repeats, "threads": args.threads,
                        "merges": merges, "seed": args.seed, "warmup": args.warmup,
                        "device": args.device}
                result = run_case(case) if args.inline else run_in_subprocess(case, args.case_timeout, args.stable_memory)
                print(_row(case, result), flush=True)
                hows.add(result.get("peak_how"))
    print(f"\n({title}: {time.perf_counter() - started:.0f} s wall, setup included; 1-minute load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)", flush=True)
    if "ru_maxrss" in hows:
        print("(peak RSS from ru_maxrss: /proc/self/clear_refs was not writable, so peaks include set-up)")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per case; the table shows medians")
    p.add_argument("--quick", action="store_true", help="targets 1,10 and preserve 0 only")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys (default: every registered method plus uce-last)")
    p.add_argument("--targets", type=_ints, default=[1, 10, 100, 1000], help="comma-separated target counts")
    p.add_argument("--preserve", type=_ints, default=[0, 1000], help="comma-separated preserve-set sizes")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--merges", default=None, help="CLIP merges file (default: open-clip-torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sdxl", action="store_true", help="also run the SDXL section (140 sites, width 2048)")
    p.add_argument("--device", default="cpu", help="where weights, CLIP and solves live (cuda: benchmarks/gpu.sh)")
    p.add_argument("--list-sections", action="store_true",
                   help="print the flags of the optional sections (help text 'also run ...') and exit")
    p.add_argument("--no-sd1", action="store_true", help="skip the SD1.5 table")
    p.add_argument("--dit", action="store_true", help="also run the DiT sections (Flux-dev, SD3.5-large, "
                   "Qwen-Image text projections), edit only, last-subject picks")
    p.add_argument("--t5-estimate", action="store_true",
                   help="time one full-size T5-XXL block on 100 prompts x 256 tokens and extrapolate")
    p.add_argument("--edit-only", action="store_true",
                   help="SD1.5 with encodings given (random, built before the clock) instead of the CLIP: "
                        "the edit alone")
    p.add_argument("--compare-rows", action="store_true",
                   help="add 'uce (last subject, all rows)': the same edit encoded at all 77 rows")
    p.add_argument("--case-timeout", type=float, default=None, help="seconds before a case is abandoned")
    p.add_argument("--stable-memory", action="store_true",
                   help="run workers with MALLOC_MMAP_THRESHOLD_=1MiB: reproducible peaks, slower encoding")
    p.add_argument("--inline", action="store_true",
                   help="run cases in this process (faster start; peak memory is then not per case)")
    p.add_argument("--warmup", action="store_true",
                   help="run one untimed erase (one other target) in each worker before the timed runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list_sections:  # benchmarks/gpu.sh runs every section the benchmark offers
        print(" ".join(a.option_strings[0] for a in p._actions if (a.help or "").startswith("also run")))
        return
    if args.worker is not None:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    if args.quick:
        args.targets, args.preserve = [1, 10], [0]
    if args.threads:
        torch.set_num_threads(args.threads)
    merges = args.merges or find_merges_file()
    tokenizer = BPETokenizer(merges)
    chosen = select(variants(args.compare_rows), args.methods)

    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({_cpu()}), device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
          + f", repeats {args.repeats} (medians)"
          + (", glibc mmap threshold fixed at 1 MiB (--stable-memory)" if args.stable_memory else ""))
    names = concept_names(tokenizer, max(args.targets), max(args.preserve), args.seed)
    lengths = sorted(len(tokenizer.ids(n)) for n in names[0] + names[1])
    print(f"concepts: artist-like names, e.g. {', '.join(names[0][:4])}; {len(lengths)} names, "
          f"{lengths[0]}-{lengths[-1]} tokens (median {statistics.median(lengths):g}); anchor '{ANCHOR}'")

    if args.edit_only and not args.no_sd1:
        run_section("SD1.5: 32 K/V sites (width 768), encodings given (edit only)", "sd1", chosen,
                    {v.key: "given" for v in chosen}, args, merges)
    elif not args.no_sd1:
        rows_for = {v.key: v.rows for v in chosen}  # None: the rows each method asks for
        run_section("SD1.5: 32 K/V sites (width 768), CLIP-L encoder", "sd1", chosen, rows_for, args, merges)
    if args.sdxl:
        wanted = {"uce", "uce-last", "speed"}
        sdxl = [v for v in chosen if v.key in wanted]
        run_section("SDXL: 140 K/V sites (width 2048), encodings given", "sdxl", sdxl,
                    {v.key: "given" for v in sdxl}, args, merges)
    if args.dit:
        dit = [v for v in chosen if v.key in ("uce-last", "speed")]
        for arch, name in DIT_ARCHS.items():
            shapes = ", ".join(f"{k.split('.', 1)[1]} {s[0]}x{s[1]}" for k, s in ec.reference_site_shapes(arch).items()
                               if k in {x.key for x in dit_sites(arch, 0)})
            run_section(f"{name}: {shapes}, encodings given", arch, dit, {v.key: "given" for v in dit}, args, merges)
    if args.t5_estimate:
        t5_estimate(args.seed)


def t5_estimate(seed: int, prompts: int = 100, tokens: int = 256, batch: int = 5, timed: int = 10) -> None:
    """One T5-XXL encoder block (d_model 4096, d_ff 10240 gated-GELU, 64 heads of 64), fp32, timed on
    ``timed`` prompts of ``tokens`` tokens, scaled to ``prompts`` and to 24 blocks (embedding lookup and
    final norm are negligible). The whole encoder is 4.76 G parameters: 19 GB in fp32, 9.5 GB in bf16."""
    torch.manual_seed(seed)
    d, ff, heads = 4096, 10240, 64
    lin = {n: torch.nn.Linear(i, o, bias=False) for n, (i, o) in
           {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "wi0": (d, ff), "wi1": (d, ff), "wo": (ff, d)}.items()}
    x = torch.randn(batch, tokens, d)
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(timed // batch):
            q, k, v = (lin[n](x).view(batch, tokens, heads, -1).transpose(1, 2) for n in "qkv")
            h = x + lin["o"](torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape))
            h = h + lin["wo"](torch.nn.functional.gelu(lin["wi0"](h), approximate="tanh") * lin["wi1"](h))
    block = (time.perf_counter() - started) * prompts / timed
    print(f"\n### T5-XXL encoding estimate\n\none block, {prompts} prompts x {tokens} tokens (timed on {timed}), fp32, "
          f"{torch.get_num_threads()} threads: {block:.1f} s -> 24 blocks ~ {24 * block:.0f} s "
          f"({24 * block / prompts:.1f} s per prompt)", flush=True)


if __name__ == "__main__":
    main()
