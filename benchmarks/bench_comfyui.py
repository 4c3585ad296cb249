"""Closed-Form Erase inside real ComfyUI (COMFYUI_PATH, --cpu): 1, 10 and 100 concepts, cold (empty
encoding cache) and cached, next to the core's own CLIP encoder on the same prompts and rows.

The checkpoint is written at start-up with seeded random weights in SD1.5's layout, so ComfyUI
detects and loads it like any SD1.5 file: ``--unet full`` (default) is the full-size UNet (32
cross-attention K/V sites), ``--unet tiny`` the two-level UNet of the tests (14 sites); CLIP-L is
always full size. Run ``python benchmarks/bench_comfyui.py --help``; benchmarks/README.md explains
the columns.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

from erasure_core import make_config  # noqa: E402

PACK = "concept_erasure_pack"
PICKS = {"default": "last word + EOT + padding", "last": "last subject token"}


def _setup_comfy(unet_dtype: str = "auto") -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.exists(os.path.join(path, "comfy", "model_patcher.py")):
        raise SystemExit("COMFYUI_PATH must point at a ComfyUI tree (this benchmark runs inside ComfyUI).")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    if unet_dtype != "auto":  # ComfyUI's --fp16-unet / --bf16-unet / --fp32-unet: how the UNet is held
        setattr(args, f"{unet_dtype}_unet", True)
    return path


def _import_pack():
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def _fill(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded weights: linear/conv ~ N(0, 1/fan_in), embeddings N(0, 0.02²), norms 1, biases 0 (fp16)."""
    out = {}
    for name, p in module.state_dict().items():
        if name.endswith("position_ids"):
            out[name] = p
        elif p.ndim >= 2:
            scale = 0.02 if "embedding" in name else p[0].numel() ** -0.5
            out[name] = (torch.randn(p.shape, generator=gen) * scale).half()
        else:
            out[name] = (torch.ones(p.shape) if name.endswith(("weight", "scale")) else torch.zeros(p.shape)).half()
    return out


def checkpoint_state_dict(unet: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD1.5-layout checkpoint (UNet, CLIP-L, VAE) with seeded random weights."""
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip

    if unet == "full":  # SD1.5: 4 levels, 2 res blocks each, attention at the first three
        shape = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                 "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
    else:
        shape = {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
                 "transformer_depth_output": [1, 1, 1, 1]}
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = openaimodel.UNetModel(
            image_size=32, in_channels=4, model_channels=320, out_channels=4, transformer_depth_middle=1,
            num_heads=8, use_spatial_transformer=True, context_dim=768, legacy=False,
            use_linear_in_transformer=False, operations=comfy.ops.disable_weight_init, **shape)
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", model), ("cond_stage_model.", clip), ("first_stage_model.", vae)):
        sd.update({prefix + k: v for k, v in _fill(module, gen).items()})
    return sd


def _run(node_cls, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return node_cls.execute(**inputs)


def _widgets(preset: str | None = None) -> dict[str, object]:
    """Closed-Form Erase's UCE widgets (token pick aside) as the core config sets them: its defaults,
    or a named preset's settings over them (solved in float64, the node's default)."""
    config = make_config("uce", **({"preset": preset} if preset else {}))
    return {"erase_scale": config.erase_scale, "preserve_scale": config.preserve_scale, "lamb": config.lamb,
            "preserve_empty_prompt": config.preserve_empty_prompt, "solve_dtype": "float64",
            "preserve_bank": config.preserve_bank}


REFERENCE = _widgets("current code (uce_sd_erase.py)")  # UCE's uce_sd_erase.py
REFERENCE_PICK = make_config("uce", preset="current code (uce_sd_erase.py)").token_pick.value  # its token pick
NODE = _widgets()  # the node's defaults


def load_concepts(targets: Sequence[str], anchor: str):
    """Load Concepts' output for ``targets`` mapped to ``anchor`` (a node of its own, not timed)."""
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    (concepts,) = _run(LoadConcepts, targets="; ".join(targets), anchors=anchor, preserve="", kind="generic",
                       preset="none", file="none", templates="as given", custom_templates="").result
    return concepts


def erase_in_graph(model, clip, concepts, pick: str, settings: dict | None = None, check: bool = True):
    """One Closed-Form Erase execution (UCE) through the node; returns (seconds, report, payload lines)."""
    from concept_erasure_pack.nodes.closed_form_erase import ClosedFormErase

    started = time.perf_counter()
    out = _run(ClosedFormErase, model=model, clip=clip, concepts=concepts, method="uce", strength=1.0,
               token_pick=pick, check=check, **(settings or NODE))
    seconds = time.perf_counter() - started
    return seconds, out.result[2], out.ui["ce_report"][0]["lines"]


def _breakdown(report: str, lines: Sequence[str]) -> dict[str, float]:
    """The report's encode / weights / solve / patch seconds, the erase's total and the check's."""
    total, inside = report.split(" s (", 1)
    out = {k: float(v) for k, v in (part.split() for part in inside.split(")", 1)[0].split(", "))}
    out["erase"] = float(total.rsplit(" ", 1)[1])
    out["check"] = float(lines[1].split("(+ check ", 1)[1].split(" s)", 1)[0])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default="1,10,100", help="comma-separated target counts")
    p.add_argument("--picks", default="default,last", help="token picks: default (last word + EOT + padding), last")
    p.add_argument("--repeats", type=int, default=3, help="cold/cached runs per case (medians)")
    p.add_argument("--unet", choices=("full", "tiny"), default="full", help="UNet size of the random checkpoint")
    p.add_argument("--unet-dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="how ComfyUI holds the UNet (its --fp16-unet etc.); auto: ComfyUI's choice (fp32 on a "
                        "CPU, ~3.4 GB for the full UNet); fp16 halves it (the node reads K/V weights in the solve dtype)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--settings", choices=("node", "reference"), default="node",
                   help="node: the node's defaults (bank on); reference: UCE's uce_sd_erase.py (bank off, preserve "
                        "scale 1, λ 0.5, no empty prompt), to set the node beside bench_reference.py's UCE row")
    p.add_argument("--check", choices=("on", "off"), default="on", help="the node's check input")
    args = p.parse_args(argv)
    check = args.check == "on"
    if args.threads:
        torch.set_num_threads(args.threads)
    _setup_comfy(args.unet_dtype)
    import comfy.sd
    import comfy.sd1_clip
    import folder_paths

    _import_pack()
    from bench_closed_form import ANCHOR, concept_names
    from concept_erasure_pack.erasure_core.edit.linalg import forget_grams  # the memo the node uses

    from erasure_core import ConceptSet
    from erasure_core.methods.closed_form import preserve_list
    from erasure_core.text.clip import BPETokenizer, ClipTextEncoder
    from erasure_core.text.encoded import TokenPick, rows_for

    t0 = time.perf_counter()
    model, clip = comfy.sd.load_state_dict_guess_config(checkpoint_state_dict(args.unet))[:2]
    print(f"checkpoint: random SD1.5 layout, {args.unet} UNet ({model.model.get_dtype()}), full CLIP-L; built and loaded in "
          f"{time.perf_counter() - t0:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}; settings: {args.settings}, check {args.check}")
    tokenizer = BPETokenizer(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer", "merges.txt"))
    core = ClipTextEncoder(tokenizer=tokenizer, seed=0)  # the same shapes as the checkpoint's CLIP-L
    counts = [int(c) for c in args.concepts.split(",") if c.strip()]
    print("\n| token pick | concepts | prompts | node cold s | erase | encode | weights | solve | patch | check "
          "| node cached s | erase | check | hit rate | core encode s | node encode / core | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: | ---: |")
    for key in args.picks.split(","):
        pick = PICKS[key.strip()]
        for n in counts:
            targets, _ = concept_names(tokenizer, n, 0, 0)
            # the prompts the node encodes for the erase: targets, anchor, the empty prompt and the default bank
            settings = REFERENCE if args.settings == "reference" else NODE
            concepts = load_concepts(targets, ANCHOR)
            prompts = list(dict.fromkeys([*targets, ANCHOR, *preserve_list(
                ConceptSet.simple(targets, (ANCHOR,)), preserve_empty=settings["preserve_empty_prompt"],
                bank=settings.get("preserve_bank", True))]))
            cold, cached, parts, warm, core_s, rates, loads = [], [], [], [], [], [], []
            for _ in range(args.repeats):
                loads.append(os.getloadavg()[0])
                with tempfile.TemporaryDirectory() as user:
                    folder_paths.set_user_directory(user)  # an empty encoding cache
                    forget_grams()  # and no Gram remembered from the last repeat (linalg.gram)
                    seconds, report, lines = erase_in_graph(model, clip, concepts, pick, settings, check)
                    cold.append(seconds)
                    parts.append(_breakdown(report, lines))
                    encoded = int(lines[2].split("prompts: ", 1)[1].split()[0])
                    if encoded != len(prompts):  # the core must encode what the node encoded
                        print(f"warning: the node encoded {encoded} prompts, the core comparison has {len(prompts)}")
                    seconds, report, lines = erase_in_graph(model, clip, concepts, pick, settings, check)
                    cached.append(seconds)
                    warm.append(_breakdown(report, lines))
                    rates.append(lines[2].split("(")[1].split()[0])
                started = time.perf_counter()
                core(prompts, rows=rows_for(TokenPick(pick)))
                core_s.append(time.perf_counter() - started)
            med = {k: statistics.median(b[k] for b in parts) for k in parts[0]}
            hot = {k: statistics.median(b[k] for b in warm) for k in warm[0]}
            print(f"| {pick} | {n} | {len(prompts)} | {statistics.median(cold):.2f} | {med['erase']:.2f} | "
                  f"{med['encode']:.2f} | {med['weights']:.2f} | {med['solve']:.2f} | {med['patch']:.2f} | "
                  f"{med['check']:.2f} | {statistics.median(cached):.2f} | {hot['erase']:.2f} | {hot['check']:.2f} | "
                  f"{rates[-1]} | {statistics.median(core_s):.2f} | {med['encode'] / statistics.median(core_s):.2f} | "
                  f"{min(loads):.1f}-{max(loads):.1f} |", flush=True)


if __name__ == "__main__":
    main()
