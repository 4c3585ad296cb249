"""Side by side with the papers' own code: UCE, SPEED and RECE on the same weights and prompts.

The reference repositories are NOT part of this repo and are never copied into it: clone them
elsewhere and pass their folders (see benchmarks/README.md)::

    python benchmarks/bench_reference.py --uce /tmp/ref/uce --speed /tmp/ref/speed \
        --rece /tmp/ref/rece --pkgs /tmp/refpkgs --repeats 3

Both sides get a seeded random SD1.4-shaped CLIP ViT-L/14 text encoder (the reference through
``transformers.CLIPTextModel``, ours through our own ``ClipTextEncoder`` with the same shapes) and
the 32 cross-attention K/V weights of a full-size SD1.4 UNet (random, as in
``bench_closed_form.py``), and the same synthetic concept names. Each work item runs each side
once untimed (one-time costs of a first call), then ours and the reference alternately ``--repeats`` times in this one process, each side first in turn; only
the edit is on the clock (the fresh modules a reference edits in place are built before it), and
ours takes every weight's ΔW, as the references write every edited weight. The table shows the
median of each side and the median of the per-pair ratios (wall clock and CPU time). Edits are not
compared here (the random CLIPs differ); tests/core compare our formulas with the references'.
The ``uce100node`` row runs ours through Closed-Form Erase in real ComfyUI instead
(``COMFYUI_PATH``; see :func:`ours_in_graph`), skipped with its reason without it.

Stubs, none of which touches the math: the references' modules are imported with their
image-generation and classifier imports replaced by stubs that raise if called; SPEED's k-means
is forced onto the CPU; diffusers' ``encode_prompt`` runs on a bare namespace pipeline.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_closed_form import ANCHOR, concept_names, model_sites  # noqa: E402
from timing import timed  # noqa: E402

import erasure_core as ec  # noqa: E402
from erasure_core.edit.linalg import forget_grams  # noqa: E402
from erasure_core.text.clip import BPETokenizer, ClipTextEncoder  # noqa: E402


@dataclass
class Work:
    key: str
    label: str
    needs: str  # which reference folder: uce, speed or rece
    targets: int
    priors: int
    node: bool = False  # ours through Closed-Form Erase in real ComfyUI (COMFYUI_PATH) instead of the core


WORKS = [
    Work("uce100", "UCE, 100 concepts, last subject token (uce_sd_erase.py)", "uce", 100, 0),
    Work("uce100node", "UCE, 100 concepts, last subject token, ours through Closed-Form Erase in real ComfyUI "
                       "(fp16 UNet, check off)", "uce", 100, 0, node=True),
    Work("speed1", "SPEED, 1 concept, multi-celebrity settings (100 priors)", "speed", 1, 100),
    Work("speed100", "SPEED, 100 concepts, multi-celebrity settings (100 priors)", "speed", 100, 100),
    Work("rece1", "RECE, 1 concept, both stages (UCE start + epochs)", "rece", 1, 0),
]


def _stub_raising(name: str) -> Callable[..., None]:
    def stub(*_a, **_k):
        raise RuntimeError(f"{name} is stubbed out in this benchmark (image generation / classifiers)")
    return stub


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _package(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so relative imports resolve against sys.modules
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _stub_pandas() -> None:
    """SPEED and RECE import pandas at module level but use it only in their CLIs / data loading."""
    if "pandas" not in sys.modules and importlib.util.find_spec("pandas") is None:  # a stub has no __spec__
        sys.modules["pandas"] = types.ModuleType("pandas")


class Reference:
    """The reference side: a transformers CLIP and a diffusers-shaped UNet of K/V Linears."""

    def __init__(self, tokenizer_dir: str, sites: Sequence[ec.AttentionSite]):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
        torch.manual_seed(0)
        config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                num_hidden_layers=12, projection_dim=768)
        self.te = CLIPTextModel(config).eval()  # SD1.4's CLIP-L shape, random
        self.sites = sites
        self.out = tempfile.mkdtemp(prefix="bench_reference_")

    def unet(self) -> torch.nn.Module:
        """A fresh module tree in diffusers' layout (``down_blocks[0]`` a "Cross…" block with
        ``attentions[i].transformer_blocks[0].attn2.to_k/to_v``), one attn2 per SD1.4 K/V pair,
        holding copies of the original weights (the references edit it in place)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for s in self.sites:
            stem, kind = s.key.rsplit(".attn2.", 1)
            pairs.setdefault(stem, {})[kind.split(".")[0]] = s.weight
        cross = type("CrossAttnDownBlock2D", (torch.nn.Module,), {})()
        cross.attentions = torch.nn.ModuleList()
        for weights in pairs.values():
            attn2 = torch.nn.Module()
            for kind, w in weights.items():
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data.copy_(w)
                setattr(attn2, kind, lin)
            block = torch.nn.Module()
            block.attn2 = attn2
            transformer = torch.nn.Module()
            transformer.transformer_blocks = torch.nn.ModuleList([block])
            cross.attentions.append(transformer)
        unet = torch.nn.Module()
        unet.down_blocks = torch.nn.ModuleList([cross])
        return unet

    def pipe(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(tokenizer=self.tok, text_encoder=self.te, unet=self.unet(),
                                     device=torch.device("cpu"), _lora_scale=None,
                                     _execution_device=torch.device("cpu"))


Job = tuple[Callable[[], object], Callable[[object], None]]
"""``(prepare, run)``: ``prepare()`` builds what one run edits in place (off the clock), ``run`` is timed."""


def reference_uce(ref: Reference, folder: str, targets: list[str]) -> Job:
    sys.path.insert(0, folder)
    import uce_sd_erase as u
    from diffusers import StableDiffusionPipeline
    u.device, u.torch_dtype = "cpu", torch.float32

    def prepare() -> types.SimpleNamespace:
        pipe = ref.pipe()
        pipe.encode_prompt = types.MethodType(StableDiffusionPipeline.encode_prompt, pipe)
        return pipe

    def run(pipe) -> None:
        u.UCE(pipe, targets, [ANCHOR] * len(targets), [], 1.0, 1.0, 0.5, ref.out, "uce")
    return prepare, run


def reference_speed(ref: Reference, folder: str, targets: list[str], priors: list[str]) -> Job:
    sys.path.insert(0, folder)
    _stub_pandas()
    import train_erase_null as ten
    real = ten.kmeans
    ten.kmeans = lambda **kw: real(**{**kw, "device": torch.device("cpu")})  # no CUDA here
    # scripts/eval_multi.sh: --params V --aug_num 10 --threshold 1e-4 --retain_scale 0.05 --disable_filter
    args = types.SimpleNamespace(params="V", aug_num=10, threshold=1e-4, retain_scale=0.05, lamb=0.0,
                                 disable_filter=True)

    def run(pipe) -> None:
        ten.edit_model(args, pipe, targets, [ANCHOR] * len(targets), priors, baseline="SPEED", device="cpu")
    return ref.pipe, run


def reference_rece(ref: Reference, folder: str, targets: list[str], epochs: int, reg: float) -> Job:
    """Stage 1: ``erase_methods/train_uce.py``'s ``edit_model`` (its CLI defaults: replace, λ 0.5,
    erase 1, preserve 0.1 on the empty prompt); stage 2: train.py's loop without its image
    validation: per epoch ``close_form_emb_regzero`` per concept, then ``edit_model_adversarial``
    (train.py's defaults: λ₁ 0.1, η 0.1, erase 1, retain ' ')."""
    root = Path(folder)
    _stub_pandas()
    _package("rece_ref")
    _package("rece_ref.erase_methods")
    _package("rece_ref.execs", generate_images=_stub_raising("generate_images"),
             compute_nudity_rate=_stub_raising("compute_nudity_rate"))
    _package("rece_ref.emb", embedding2img=_stub_raising("embedding2img"), setup_seed=_stub_raising("setup_seed"))
    train_uce = _load("rece_ref.erase_methods.train_uce", root / "erase_methods" / "train_uce.py")
    adversarial = _load("rece_ref.erase_methods.uce", root / "erase_methods" / "uce.py")
    emb = _load("rece_ref.emb.close_form_emb", root / "utils" / "embedding_calculation" / "close_form_emb.py")

    def run(pipes) -> None:
        model, original = pipes
        model = train_uce.edit_model(model, targets, [ANCHOR] * len(targets), None, lamb=0.5, erase_scale=1.0,
                                     preserve_scale=0.1, technique="replace")
        for _ in range(epochs):
            adv, new = [], []
            for concept in targets:
                ids = ref.tok(ANCHOR, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
                new.append(ref.te(ids)[0][0])
                _, a = emb.close_form_emb_regzero(model, original, concept, with_to_k=True, save_path=None,
                                                  regeular_scale=reg)
                adv.append(a[0])
            model = adversarial.edit_model_adversarial(model, adv, new, [" "] * len(targets), technique="replace",
                                                       preserve_scale=0.1, erase_scale=1.0, lamb=0.1)
    return (lambda: (ref.pipe(), ref.pipe())), run


def ours(work: Work, sites, clip, targets, priors, rece_epochs: int, rece_reg: float) -> Job:
    if work.needs == "uce":
        method, config = "uce", ec.make_config("uce", preset="current code (uce_sd_erase.py)")
    elif work.needs == "speed":
        method, config = "speed", ec.make_config("speed", preset="multi-celebrity")
    else:
        method = "rece"
        config = ec.make_config("rece", epochs=rece_epochs, reg=rece_reg, preserve_bank=False, keep_erased=False,
                                lamb=0.5)  # the paper's step and UCE start, as the reference runs them
    concepts = ec.ConceptSet.simple(targets, (ANCHOR,), priors)

    def run(_) -> None:  # every weight's ΔW taken, as the references write every edited weight
        forget_grams()  # a first run: the references remember nothing between runs
        patch = ec.erase(method, sites, concepts, clip, config)
        for entry in patch.entries.values():
            entry.dense()
    return (lambda: None), run


def ours_in_graph(targets: list[str]) -> Job:
    """Closed-Form Erase executed in real ComfyUI (``COMFYUI_PATH``, CPU) on a random SD1.5-layout
    checkpoint loaded with an fp16 UNet, as ``bench_comfyui.py --settings reference --check off``
    runs it: UCE with uce_sd_erase.py's settings and token pick. Each run is cold: an empty encoding
    cache (a fresh user folder) and no remembered Gram, set up off the clock. Load Concepts' output
    is made once (ComfyUI keeps a node's output while its inputs stay the same); Closed-Form Erase's
    whole execution is timed (encode through ComfyUI's CLIP, weight reads, solve, patch); its edit
    on an fp16 UNet is a float32 context transform that ComfyUI applies when sampling, so there is
    no weight to write."""
    import bench_comfyui as bc

    bc._setup_comfy("fp16")
    import comfy.sd
    import folder_paths

    bc._import_pack()
    from concept_erasure_pack.erasure_core.edit.linalg import forget_grams as forget_node_grams

    model, clip = comfy.sd.load_state_dict_guess_config(bc.checkpoint_state_dict("full"))[:2]
    concepts = bc.load_concepts(targets, ANCHOR)  # Load Concepts' output, which ComfyUI keeps between runs
    user: list[tempfile.TemporaryDirectory] = []

    def prepare() -> None:
        if user:
            user.pop().cleanup()
        user.append(tempfile.TemporaryDirectory(prefix="bench_reference_user_"))
        folder_paths.set_user_directory(user[0].name)  # an empty encoding cache
        forget_node_grams()

    def run(_) -> None:
        bc.erase_in_graph(model, clip, concepts, bc.REFERENCE_PICK, bc.REFERENCE, check=False)
    return prepare, run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uce", help="folder holding UCE's uce_sd_erase.py (rohitgandikota/unified-concept-editing)")
    parser.add_argument("--speed", help="folder holding SPEED's train_erase_null.py and src/ (Ouxiang-Li/SPEED)")
    parser.add_argument("--rece", help="RECE's repository root (CharlesGong12/RECE: erase_methods/, utils/)")
    parser.add_argument("--pkgs", help="extra folder on sys.path for the references' packages "
                                       "(diffusers, kmeans_pytorch), e.g. a `pip install --target` folder")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder for transformers "
                                            "(default: $COMFYUI_PATH/comfy/sd1_tokenizer)")
    parser.add_argument("--works", default=",".join(w.key for w in WORKS),
                        help=f"comma-separated subset of {', '.join(w.key for w in WORKS)}")
    parser.add_argument("--repeats", type=int, default=3, help="pairs per work item (median shown)")
    parser.add_argument("--rece-epochs", type=int, default=3, help="RECE epochs (train.py's default 3)")
    parser.add_argument("--rece-reg", type=float, default=0.1, help="RECE λ_reg (train.py's default 0.1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.pkgs:
        sys.path.insert(0, args.pkgs)
    tokenizer_dir = args.tokenizer or os.path.join(os.environ.get("COMFYUI_PATH", ""), "comfy", "sd1_tokenizer")
    wanted = [w for w in WORKS if w.key in args.works.split(",")]

    bpe = BPETokenizer()
    sites = model_sites("sd1", 0)
    clip = ClipTextEncoder(tokenizer=bpe, seed=0)
    ref: Reference | None = None
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} pairs per row", flush=True)
    for work in wanted:
        folder = getattr(args, work.needs)
        reason = None
        if not folder or not Path(folder).is_dir():
            reason = f"--{work.needs} not given" if not folder else f"{folder} is not a folder"
        elif not Path(tokenizer_dir, "vocab.json").is_file():
            reason = f"no CLIP tokenizer at {tokenizer_dir} (--tokenizer or COMFYUI_PATH)"
        if reason is None:
            try:
                ref = ref or Reference(tokenizer_dir, sites)
                targets, priors = concept_names(bpe, work.targets, work.priors, 0)
                if work.needs == "uce":
                    reference = reference_uce(ref, folder, targets)
                elif work.needs == "speed":
                    reference = reference_speed(ref, folder, targets, priors)
                else:
                    reference = reference_rece(ref, folder, targets, args.rece_epochs, args.rece_reg)
            except (ImportError, OSError, AttributeError) as exc:
                reason = f"reference could not be loaded: {type(exc).__name__}: {exc}"
        if reason is not None:
            print(f"skip {work.key}: {reason}", flush=True)
            rows.append((work.label, None, reason))
            continue
        if work.node:
            if not os.path.isfile(os.path.join(os.environ.get("COMFYUI_PATH", ""), "comfy", "model_patcher.py")):
                print(f"skip {work.key}: COMFYUI_PATH does not point at a ComfyUI tree", flush=True)
                rows.append((work.label, None, "COMFYUI_PATH does not point at a ComfyUI tree"))
                continue
            mine = ours_in_graph(targets)
        else:
            mine = ours(work, sites, clip, targets, priors, args.rece_epochs, args.rece_reg)
        # one untimed run of each side first: a process's first call pays one-time costs (ComfyUI
        # loading the CLIP, oneDNN building kernels for shapes it has not met)
        for prepare, run in (mine, reference):
            run(prepare())
        pairs = []
        for i in range(args.repeats):
            timings = {}
            for side in ((mine, reference) if i % 2 == 0 else (reference, mine)):  # each side goes first in turn
                prepare, run = side
                state = prepare()
                timings[id(side)] = timed(lambda run=run, state=state: run(state))
            o, r = timings[id(mine)], timings[id(reference)]
            pairs.append((r, o))
            print(f"{work.key} pair {i}: reference {r[0]:.2f} s ({r[1]:.2f} CPU-s), ours {o[0]:.2f} s "
                  f"({o[1]:.2f} CPU-s), ratio {r[0] / o[0]:.1f}x, load {os.getloadavg()[0]:.1f}", flush=True)
        rows.append((work.label, pairs, None))

    print("\n| work | reference s | ours s | ratio (median of pairs) | reference CPU-s | ours CPU-s | CPU ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, pairs, reason in rows:
        if pairs is None:
            print(f"| {label} | skipped: {reason} | | | | | |")
            continue
        med = statistics.median
        ref_wall, our_wall = med(r[0] for r, _ in pairs), med(o[0] for _, o in pairs)
        ref_cpu, our_cpu = med(r[1] for r, _ in pairs), med(o[1] for _, o in pairs)
        ratio = med(r[0] / o[0] for r, o in pairs)
        cpu_ratio = med(r[1] / max(o[1], 1e-9) for r, o in pairs)
        print(f"| {label} | {ref_wall:.2f} | {our_wall:.3f} | {ratio:.1f}× | {ref_cpu:.2f} | {our_cpu:.3f} | "
              f"{cpu_ratio:.1f}× |")


if __name__ == "__main__":
    main()
