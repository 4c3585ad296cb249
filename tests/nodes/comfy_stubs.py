"""The node tier without ComfyUI: hand-written stubs of the ComfyUI modules the pack imports, and
tiny seeded fakes of a MODEL (``FakePatcher``) and a CLIP (``FakeClip``).

``stubbed_pack()`` puts the stubs into ``sys.modules`` with ``unittest.mock.patch.dict`` (the
technique of ComfyUI's ``tests-unit``) and imports the repository as the package
``concept_erasure_stubbed``. Leaving the context restores ``sys.modules`` as it was, which drops
both the stubs and every ``concept_erasure_stubbed.*`` module, so the real-ComfyUI tests (which
import the pack as ``concept_erasure_pack``) never see either.

The stubs are deliberately minimal: they record what the pack passes and implement only the
calls it makes (``calculate_weight`` knows ``diff`` and ``LoRAAdapter``, nothing else).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

import torch
from comfy_env import import_pack, merges_file

# The core's dependencies (torch, safetensors, ...) are imported here, outside the patch, so that
# restoring sys.modules afterwards drops only the stubs and the stubbed package.
import erasure_core  # noqa: F401

PACK_NAME = "concept_erasure_stubbed"
REAL_PACK_NAME = "concept_erasure_pack"  # the name tests/integration imports the pack under
STUB_NAMES = ("comfy_api", "comfy_api.latest", "comfy", "comfy.lora", "comfy.model_management",
              "comfy.utils", "comfy.weight_adapter", "comfy.sd1_clip", "comfy.sdxl_clip", "comfy.clip_model",
              "comfy.ops", "folder_paths")
PREFIX = "diffusion_model."


def _module(name: str, package: bool = False, **attrs: Any) -> ModuleType:
    """A module object with a spec (``importlib.util.find_spec`` refuses modules without one)."""
    module = ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    module.__dict__.update(attrs)
    return module


# -- comfy_api.latest: io and ui ---------------------------------------------------------------


class _Socket:
    """An input or output: keeps its id and keyword arguments as attributes, like the real ones."""

    io_type = ""

    def __init__(self, id: str | None = None, **kwargs: Any):
        self.id = id
        self.display_name = None
        self.tooltip = None
        self.__dict__.update(kwargs)


class _ComboInput(_Socket):
    """Like the real Combo input, an Enum class for ``options`` becomes the list of its values."""

    def __init__(self, id: str, options: Any = None, default: Any = None, **kwargs: Any):
        if isinstance(options, type) and issubclass(options, Enum):
            options = [m.value for m in options]
        if isinstance(default, Enum):
            default = default.value
        super().__init__(id, options=options, default=default, **kwargs)


def _socket_type(io_type: str, input_base: type = _Socket) -> type:
    attrs = {"io_type": io_type}
    return type(io_type.title(), (), {
        "io_type": io_type,
        "Input": type("Input", (input_base,), attrs),
        "Output": type("Output", (_Socket,), attrs),
    })


class _Schema:
    """Records its keyword arguments as attributes."""

    def __init__(self, **kwargs: Any):
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.__dict__.update(kwargs)


class _NodeOutput:
    def __init__(self, *args: Any, ui: Any = None):
        self.result = args
        self.ui = ui


class _ComfyNode:
    """Base class of V3 nodes (the real one adds validation and the node-info plumbing)."""


class _ComfyExtension:
    async def get_node_list(self) -> list[type]:
        raise NotImplementedError


class _PreviewText:
    def __init__(self, value: str):
        self.value = value


def _comfy_api() -> dict[str, ModuleType]:
    io = SimpleNamespace(
        ComfyNode=_ComfyNode,
        Schema=_Schema,
        NodeOutput=_NodeOutput,
        Custom=_socket_type,
        Model=_socket_type("MODEL"),
        Clip=_socket_type("CLIP"),
        String=_socket_type("STRING"),
        Float=_socket_type("FLOAT"),
        Int=_socket_type("INT"),
        Boolean=_socket_type("BOOLEAN"),
        Combo=_socket_type("COMBO", _ComboInput),
        Conditioning=_socket_type("CONDITIONING"),
        Latent=_socket_type("LATENT"),
        Image=_socket_type("IMAGE"),
    )
    ui = SimpleNamespace(PreviewText=_PreviewText)
    latest = _module("comfy_api.latest", package=True, ComfyExtension=_ComfyExtension, io=io, ui=ui)
    return {"comfy_api": _module("comfy_api", package=True, latest=latest), "comfy_api.latest": latest}


# -- comfy: model_management, utils, weight_adapter, lora --------------------------------------


def _model_management() -> ModuleType:
    mm = _module("comfy.model_management", interrupt_processing=False)

    class InterruptProcessingException(Exception):
        pass

    def get_torch_device() -> torch.device:
        return torch.device("cpu")

    def cast_to_device(tensor: torch.Tensor, device: Any, dtype: Any, copy: bool = False) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype, copy=copy)

    def throw_exception_if_processing_interrupted() -> None:
        if mm.interrupt_processing:  # as ComfyUI: the flag is cleared when it fires
            mm.interrupt_processing = False
            raise mm.InterruptProcessingException()

    mm.__dict__.update(InterruptProcessingException=InterruptProcessingException,
                       get_torch_device=get_torch_device, cast_to_device=cast_to_device,
                       throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted)
    return mm


def _utils() -> ModuleType:
    bars: list[Any] = []

    class ProgressBar:
        """Records every ``(value, total)`` it is given."""

        def __init__(self, total: int, node_id: Any = None):
            self.total, self.current, self.updates = total, 0, []
            bars.append(self)

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            self.updates.append((self.current, self.total))

        def update(self, value: int) -> None:
            self.update_absolute(self.current + value)

    return _module("comfy.utils", ProgressBar=ProgressBar, bars=bars)


class _LoRAAdapter:
    name = "lora"

    def __init__(self, loaded_keys: Any, weights: tuple[Any, ...]):
        self.loaded_keys = loaded_keys
        self.weights = weights


def _lora(weight_adapter: ModuleType, mm: ModuleType) -> ModuleType:
    def calculate_weight(patches: list[tuple], weight: torch.Tensor, key: str,
                         intermediate_dtype: torch.dtype = torch.float32, original_weights: Any = None) -> torch.Tensor:
        """ComfyUI's patch arithmetic for the two kinds the pack adds: ``diff`` and LoRA up @ down."""
        for strength, value, strength_model, offset, function in patches:
            if strength_model != 1.0 or offset is not None or function is not None:
                raise NotImplementedError("the stub knows only plain patches")
            if isinstance(value, weight_adapter.LoRAAdapter):
                up, down, alpha = value.weights[:3]
                if alpha is not None or any(v is not None for v in value.weights[3:]):
                    raise NotImplementedError("the stub knows only alpha-free, plain LoRA")
                delta = mm.cast_to_device(up, weight.device, intermediate_dtype) @ \
                    mm.cast_to_device(down, weight.device, intermediate_dtype)
            elif value[0] == "diff" and len(value[1]) == 1:
                delta = value[1][0]
            else:
                raise NotImplementedError(f"the stub does not know patch {value[0]!r}")
            weight += strength * mm.cast_to_device(delta, weight.device, weight.dtype).reshape(weight.shape)
        return weight

    def model_lora_keys_unet(model: Any, key_map: dict[str, str]) -> dict[str, str]:
        """kohya names of the model's own (LDM) keys; the real one adds diffusers names too."""
        for k in model.state_dict():
            if k.startswith(PREFIX) and k.endswith(".weight"):
                key_map["lora_unet_" + k[len(PREFIX):-len(".weight")].replace(".", "_")] = k
        return key_map

    return _module("comfy.lora", calculate_weight=calculate_weight, model_lora_keys_unet=model_lora_keys_unet)


def _folder_paths(base: str) -> ModuleType:
    """ComfyUI's folder registry over a temporary base folder (models/, input/)."""
    models_dir, input_dir = os.path.join(base, "models"), os.path.join(base, "input")
    os.makedirs(input_dir)
    user_dir = os.path.join(base, "user")
    module = _module("folder_paths", models_dir=models_dir, folder_names_and_paths={},
                     get_input_directory=lambda: input_dir, get_user_directory=lambda: user_dir)

    def get_folder_paths(name: str) -> list[str]:
        return module.folder_names_and_paths[name][0][:]

    def get_filename_list(name: str) -> list[str]:
        folders, extensions = module.folder_names_and_paths[name]
        out = []
        for folder in folders:
            for root, _dirs, files in os.walk(folder):
                out += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/") for f in files
                        if not extensions or os.path.splitext(f)[1].lower() in extensions]
        return sorted(out)

    module.get_folder_paths, module.get_filename_list = get_folder_paths, get_filename_list
    return module


def _sd1_clip(base: str) -> ModuleType:
    """Only its location matters: ComfyUI ships CLIP's merges in ``sd1_tokenizer/`` beside it."""
    folder = os.path.join(base, "comfy", "sd1_tokenizer")
    os.makedirs(folder)
    source = merges_file()
    if source is not None:
        opener = gzip.open if source.endswith(".gz") else open
        with opener(source, "rt", encoding="utf-8") as f, open(os.path.join(folder, "merges.txt"), "w") as out:
            out.write(f.read())
    # the CLIP classes are only compared with (a stub CLIP is none of them: its encodings run whole)
    return _module("comfy.sd1_clip", __file__=os.path.join(base, "comfy", "sd1_clip.py"),
                   **{n: type(n, (), {}) for n in ("SD1ClipModel", "SDClipModel", "ClipTokenWeightEncoder")})


def make_stubs() -> dict[str, ModuleType]:
    """Fresh stub modules (fresh state: interrupt flag, progress bars) for one import of the pack."""
    base = tempfile.mkdtemp(prefix="ce_stub_comfy_")
    sd1_clip = _sd1_clip(base)
    mm = _model_management()
    utils = _utils()
    weight_adapter = _module("comfy.weight_adapter", package=True, LoRAAdapter=_LoRAAdapter)
    lora = _lora(weight_adapter, mm)
    # `import comfy.lora` finds the submodule in sys.modules and then reads it as an attribute.
    sdxl_clip = _module("comfy.sdxl_clip", SDXLClipModel=type("SDXLClipModel", (), {}))
    clip_model = _module("comfy.clip_model", **{n: type(n, (), {}) for n in ("CLIPTextModel", "CLIPTextModel_",
                                                                               "CLIPEncoder")})
    ops = _module("comfy.ops")
    comfy = _module("comfy", package=True, lora=lora, model_management=mm, utils=utils,
                    weight_adapter=weight_adapter, sd1_clip=sd1_clip, sdxl_clip=sdxl_clip, clip_model=clip_model,
                    ops=ops)
    stubs = {"comfy": comfy, "comfy.lora": lora, "comfy.model_management": mm, "comfy.utils": utils,
             "comfy.weight_adapter": weight_adapter, "comfy.sd1_clip": sd1_clip, "comfy.sdxl_clip": sdxl_clip,
             "comfy.clip_model": clip_model, "comfy.ops": ops,
             "folder_paths": _folder_paths(base), **_comfy_api()}
    assert set(stubs) == set(STUB_NAMES)
    return stubs


# -- importing the pack ----------------------------------------------------------------------------


@dataclass
class NodeEnv:
    """The pack as imported against one ComfyUI API (``"stub"`` or ``"real"``)."""

    api: str
    pack: ModuleType
    comfy: dict[str, ModuleType] = field(default_factory=dict)

    @property
    def core(self) -> ModuleType:
        """The pack's own ``erasure_core`` (its error classes differ from the top-level copy's)."""
        return self.pack.erasure_core

    def calculate_weight(self, patches: list[tuple], weight: torch.Tensor, key: str) -> torch.Tensor:
        return self.comfy["comfy.lora"].calculate_weight(patches, weight, key)


def _is_stubbed(name: str) -> bool:
    """A stub, the stubbed pack, or anything imported under a stub's name."""
    return name.split(".")[0] in {PACK_NAME, "comfy", "comfy_api", "folder_paths"}


@contextlib.contextmanager
def stubbed_pack() -> Iterator[NodeEnv]:
    """The pack imported as ``concept_erasure_stubbed`` against fresh stubs, for the duration of
    the block (its modules run relative imports at call time, so tests run inside it).

    On exit ``patch.dict`` restores ``sys.modules``: the stubs and the stubbed pack go, and real
    ``comfy`` modules, if any were loaded, come back. Modules that something unrelated imported
    for the first time meanwhile (torch loads some lazily, e.g. in ``assert_close``) are put
    back afterwards: importing those twice would register torch operators twice.
    """
    stubs = make_stubs()
    before = set(sys.modules)
    lazily_loaded: dict[str, ModuleType] = {}
    with mock.patch.dict(sys.modules, stubs):
        try:
            yield NodeEnv("stub", import_pack(PACK_NAME), stubs)
        finally:
            lazily_loaded = {n: m for n, m in sys.modules.items() if n not in before and not _is_stubbed(n)}
    sys.modules.update(lazily_loaded)


def real_pack(comfyui: str) -> NodeEnv:
    """The pack against the real ComfyUI at ``comfyui`` (shared with tests/integration)."""
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: no GPU here
    import folder_paths

    folder_paths.set_user_directory(tempfile.mkdtemp(prefix="ce_real_user_"))  # the encoding cache
    pack = sys.modules.get(REAL_PACK_NAME) or import_pack(REAL_PACK_NAME)
    return NodeEnv("real", pack, {name: importlib.import_module(name) for name in STUB_NAMES})


# -- a MODEL and a CLIP --------------------------------------------------------------------------


def _identity_convert(weight: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return weight


class FakePatcher:
    """ComfyUI's ModelPatcher, as far as the pack uses it: shared weights, per-clone patch lists."""

    def __init__(self, weights: dict[str, torch.Tensor], patches: dict[str, list[tuple]] | None = None):
        self.weights = weights
        self.patches: dict[str, list[tuple]] = {} if patches is None else patches

    @property
    def model(self) -> Any:
        """The BaseModel stand-in: what ``comfy.lora.model_lora_keys_unet`` reads."""
        return SimpleNamespace(state_dict=lambda: self.weights)

    def clone(self) -> FakePatcher:
        return FakePatcher(self.weights, {k: v[:] for k, v in self.patches.items()})

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[str]:
        """Append a patch to every key this model has; unknown keys are dropped silently."""
        accepted = []
        for key, value in patches.items():
            if key in self.weights:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
                accepted.append(key)
        return accepted

    def model_state_dict(self, filter_prefix: str | None = None) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.weights.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def get_key_patches(self, filter_prefix: str | None = None) -> dict[str, list[Any]]:
        return {k: [(w, _identity_convert), *self.patches.get(k, [])]
                for k, w in self.model_state_dict(filter_prefix).items()}


SITE_BLOCKS = {"input_blocks.1.1": 8, "middle_block.1": 16, "output_blocks.3.1": 8}  # block -> d_out
CONTEXT_WIDTH = 768  # SD1.x cross-attention reads 768-wide CLIP-L states: detect() checks it


def site_key(block: str, proj: str) -> str:
    return f"{PREFIX}{block}.transformer_blocks.0.attn2.to_{proj}.weight"


def sd1_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights named like ComfyUI's SD1.x UNet keys: the marker conv, a query projection
    (not an edit site) and K/V projections of width 768 with small outputs."""
    gen = torch.Generator().manual_seed(seed)
    weights = {f"{PREFIX}input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=gen)}
    for block, d_out in SITE_BLOCKS.items():
        weights[f"{PREFIX}{block}.transformer_blocks.0.attn2.to_q.weight"] = torch.randn(d_out, d_out, generator=gen)
        for proj in ("k", "v"):
            weights[site_key(block, proj)] = torch.randn(d_out, CONTEXT_WIDTH, generator=gen) / CONTEXT_WIDTH**0.5
    return weights


def sd1_site_keys() -> list[str]:
    return sorted(site_key(block, proj) for block in SITE_BLOCKS for proj in ("k", "v"))


def flux_weights() -> dict[str, torch.Tensor]:
    return {f"{PREFIX}txt_in.weight": torch.zeros(16, 32),
            f"{PREFIX}double_blocks.0.txt_attn.qkv.weight": torch.zeros(48, 16)}


class FakeClip:
    """ComfyUI's CLIP for SD1.x, as far as the pack uses it.

    ``tokenize`` gives ``{"l": [window, ...]}``: 77-token windows ``[start, words..., end, pad...]``
    of (id, weight) pairs, 75 words each, words hashed to ids. ``encode_from_tokens`` gives
    ``[1, 77 * windows, 768]``: a seeded embedding of each id, then a running mean over the
    window's positions (causal, so each row depends on the tokens before it).
    """

    START, END, LENGTH, VOCAB = 49406, 49407, 77, 997

    def __init__(self, width: int = CONTEXT_WIDTH, seed: int = 0):
        self.table = torch.randn(self.VOCAB, width, generator=torch.Generator().manual_seed(seed))
        self.encoded_windows: list[int] = []  # windows per encode_from_tokens call
        # What the encoding cache's fingerprint reads: the weights and the CLIP's patches.
        self.cond_stage_model = torch.nn.Embedding.from_pretrained(self.table)
        self.patcher = SimpleNamespace(patches={})
        self.layer_idx = None

    def _word_id(self, word: str) -> int:
        return zlib.crc32(word.encode()) % self.START

    def tokenize(self, text: str) -> dict[str, list[list[tuple[int, float]]]]:
        ids = [self._word_id(w) for w in text.lower().split()]
        chunks = [ids[i : i + self.LENGTH - 2] for i in range(0, len(ids), self.LENGTH - 2)] or [[]]
        windows = []
        for chunk in chunks:
            row = [self.START, *chunk, self.END]
            row += [self.END] * (self.LENGTH - len(row))
            windows.append([(tok, 1.0) for tok in row])
        return {"l": windows}

    def encode_from_tokens(self, tokens: dict[str, list[list[tuple[int, float]]]]) -> torch.Tensor:
        ids = torch.tensor([[tok for tok, _ in window] for window in tokens["l"]])
        self.encoded_windows.append(ids.shape[0])
        emb = self.table[ids % self.VOCAB]
        hidden = emb.cumsum(1) / torch.arange(1, self.LENGTH + 1).view(1, -1, 1)
        return hidden.reshape(1, -1, hidden.shape[-1])
