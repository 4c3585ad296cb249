"""``python -m erasure_core erase CHECKPOINT ...``: a closed-form erasure of a single-file SD1.x,
SD2.x or SDXL checkpoint, written as the LoRA file Save Erasure writes.

The K/V weights and the text encoder are read from the file (safetensors one tensor at a time;
``.ckpt`` only through ``torch.load(weights_only=True)``); concepts are encoded with the
checkpoint's own CLIP in the core's encoder (``text/clip_weights.py``), as ComfyUI reads that
architecture's; concepts and options mean what Load Concepts' and Closed-Form Erase's inputs mean
(the same core functions build them), so the same inputs give the same PatchSet and the same bytes
(``formats/lora_out.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from enum import Enum

import torch

from .. import ClosedFormConfig, ErasureError, methods, node_config
from ..concepts import ConceptKind, check_prompt_lengths
from ..config import option_meta
from ..formats.checkpoint import open_checkpoint
from ..formats.concept_files import TemplateMode, assemble, list_preserve_sets, list_presets
from ..formats.lora_out import DenseAs, Precision, lora_bytes
from ..formats.safetensors_out import write_atomic
from ..text.clip import BPETokenizer
from .common import MemoEncoder, StderrProgress, kv_check

# Closed-Form Erase's widgets (nodes/closed_form_erase.py OPTIONS): UCE's options, used by the methods
# that share them; SPEED, RECE and RealEra run their paper defaults, as in the node without options.
OPTIONS = ("token_pick", "erase_scale", "preserve_scale", "lamb", "preserve_empty_prompt", "solve_dtype")


def _help(text: str) -> str:
    return text.replace("%", "%%")


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "erase", help="erase concepts from a single-file SD1.x/SD2.x/SDXL checkpoint and write a LoRA",
        description="Read the cross-attention K/V weights and the text encoder from CHECKPOINT, solve a closed-form "
                    "erasure with the checkpoint's own CLIP, and write it as a standard LoRA file (the file Save "
                    "Erasure writes: ComfyUI's Load LoRA, Apply Eraser LoRA and kohya-style tools read it). Progress "
                    "goes to stderr; the report and a line saying whether the erasure worked go to stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="single-file checkpoint: .safetensors, or .ckpt/.pt read with torch.load(weights_only=True)")
    e.add_argument("--out", required=True, help="the LoRA file to write ('.safetensors' is added when missing)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists (else refuse, before any work)")
    c = e.add_argument_group("concepts (as Load Concepts' inputs)")
    c.add_argument("--targets", default="", help="concepts to erase, one per line or ';'-separated: "
                                                 "'name | alias | alias -> anchor'")
    c.add_argument("--anchors", default="", help="anchor(s) of targets typed without '->': one for all, or one per "
                                                 "target; empty erases toward nothing")
    c.add_argument("--preserve", default="", help="concepts whose images must not change, ';'-separated")
    c.add_argument("--kind", default=ConceptKind.GENERIC.value, choices=[k.value for k in ConceptKind],
                   help="kind of the typed concepts (picks built-in templates)")
    c.add_argument("--preset", default=None, choices=list_presets(), help="a built-in concept list, merged after "
                                                                          "the typed ones")
    c.add_argument("--concepts-file", default=None, help="a .txt/.csv/.json concept file (Load Concepts' formats)")
    c.add_argument("--templates", default=TemplateMode.AS_GIVEN.value, choices=[m.value for m in TemplateMode],
                   help="expand each name into prompts: the file's/preset's, built-in per kind, or --custom-templates")
    c.add_argument("--custom-templates", default="", help="with --templates custom: templates, one per line, '{}' "
                                                          "marks the concept")
    c.add_argument("--preserve-set", default=None, choices=list_preserve_sets(),
                   help="add a large built-in preserve list")
    m = e.add_argument_group("method (as Closed-Form Erase's inputs)")
    m.add_argument("--method", default="uce", choices=methods.names(),
                   help=_help(" ".join(f"{n}: {methods.get(n).description}" for n in methods.names())))
    for name in OPTIONS:
        meta = option_meta(ClosedFormConfig, name)
        flag, default = "--" + name.replace("_", "-"), meta["default"]
        if isinstance(default, bool):
            m.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_help(meta["help"]))
        elif isinstance(default, Enum):
            m.add_argument(flag, default=default.value, choices=[v.value for v in type(default)],
                           help=_help(meta["help"]))
        else:
            m.add_argument(flag, type=type(default), default=default,
                           help=_help(f"{meta['help']} Range {meta['min']} to {meta['max']}."))
    s = e.add_argument_group("file (as Save Erasure's inputs)")
    s.add_argument("--dense-as", default=DenseAs.DIFFERENCE.value, choices=[d.value for d in DenseAs],
                   help="full-rank edits stored exactly as weight differences (ComfyUI 'diff' keys) or factored to "
                        "--max-rank/--max-error")
    s.add_argument("--max-rank", type=int, default=64, help="with --dense-as 'low rank': largest rank per weight")
    s.add_argument("--max-error", type=float, default=0.01,
                   help="with --dense-as 'low rank': target relative error per weight")
    s.add_argument("--precision", default=Precision.FLOAT16.value, choices=[p.value for p in Precision],
                   help="number format of the file")
    r = e.add_argument_group("run")
    r.add_argument("--merges", default=None, help="CLIP's BPE merges file (default: the one inside open-clip-torch)")
    r.add_argument("--device", default="cpu", help="torch device to encode and solve on (cpu, cuda, cuda:1...)")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    e.set_defaults(run=run)


def output_path(out: str, overwrite: bool) -> str:
    """``--out`` with '.safetensors', checked before any work: its folder exists, the file is new
    unless --overwrite."""
    path = out if out.lower().endswith(".safetensors") else out + ".safetensors"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ErasureError(f"--out must be in an existing folder, but '{folder}' is not one. Create it first.",
                           input_name="out")
    if os.path.exists(path) and not overwrite:
        raise ErasureError(f"--out must name a new file unless --overwrite is given, but '{path}' exists.",
                           input_name="out")
    return path


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = output_path(args.out, args.overwrite)
    concepts = assemble(targets=args.targets, anchors=args.anchors, preserve=args.preserve, kind=args.kind,
                        preset=args.preset, file=args.concepts_file, templates=args.templates,
                        custom_templates=args.custom_templates, preserve_set=args.preserve_set)
    config, source = node_config(args.method, {name: getattr(args, name) for name in OPTIONS})
    tokenizer = BPETokenizer(args.merges)
    check_prompt_lengths(concepts, lambda text: len(tokenizer.ids(text)))
    print(f"reading {args.checkpoint}", file=sys.stderr)
    ckpt = open_checkpoint(args.checkpoint)
    encoder = MemoEncoder(ckpt.text_encoder(tokenizer, device=args.device))
    sites = ckpt.sites(device=args.device)
    print(f"{ckpt.arch.display_name}: {len(sites)} K/V sites; {len(concepts.targets)} targets, "
          f"{len(concepts.preserve)} preserved; {args.method.upper()} with {source}", file=sys.stderr)
    patch = methods.get(args.method).solve(sites, concepts.require_targets(), encoder, config, device=args.device,
                                           progress=StderrProgress(args.method))
    data, report = lora_bytes(patch, dense_as=args.dense_as, max_rank=args.max_rank, max_error=args.max_error,
                              precision=args.precision, progress=StderrProgress("write"))
    write_atomic(path, data)
    check = kv_check(sites, patch, concepts, encoder, getattr(config, "token_pick", None) or ClosedFormConfig().token_pick)
    print(f"{args.method.upper()} on {ckpt.name} ({ckpt.arch.display_name}): {patch.meta.get('sites')} sites, "
          f"rank {patch.meta.get('rank')}, {time.perf_counter() - started:.1f} s in all")
    print(f"wrote {path}")
    for line in report.lines():
        print("  " + line)
    print(check.verdict())
    return 0
