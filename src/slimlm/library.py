"""The variant library: every layer's sub-blocks at every level of the search space, reformed once.

EvoPress (ICML 2025), Týr-the-Pruner and DarwinLM search what they ship: they build, once, a
per-layer database of compressed and weight-corrected variants, then evolve assignments of levels
to layers by stitching stored weights. slimlm's library holds, for each decoder layer, its attention
at each grouped-query shape of the space and its MLP at each width of the space: which units are
kept (the most important, as every candidate keeps them) and the output projection reformed over
them. A removed sub-block needs no weights.

Reformation here is the closed form from the *dense* model's inputs, one layer at a time:
Ŵ = W G[:, K] (G[K, K] + λI)⁻¹ with G = X Xᵀ the Gram matrix of the projection's inputs on the
calibration windows. It does not depend on the other layers' choices, so one solve per (layer, level)
serves every candidate, every worker and every resumed run. The shipped winner still gets the
sequential reformation of ``slimlm.reform``.

Stored as one safetensors file per layer under the cache, keyed by the model's weights, the
calibration tokens, the importance scores, the space's levels and the damping: a killed build
resumes at the first layer not yet written.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from slimlm.cache import cache_root, computed_once, tensor_digest
from slimlm.errors import SlimlmError
from slimlm.importance import Importance
from slimlm.models import LoadedModel
from slimlm.models.base import LayerShape
from slimlm.progress import track
from slimlm.reform import DAMPING, StoredWeights, add_gram, layer_inputs, layer_pass, ridge
from slimlm.space import SearchSpace, keep_most_important
from slimlm.stream import resident
from slimlm.subnet import SubNetwork

FORMAT = "slimlm.library/1"


@dataclass
class VariantLibrary:
    """Kept units and reformed output projections of every (layer, level); each weight is read when used.

    Nothing is cached in memory: a candidate reads only its own levels (from the page cache once
    warm), so the library costs no more memory than one candidate's projections, however many
    levels it holds (1.8 GB on disk for SmolLM2's default space).
    """

    folder: Path
    keeps: list[dict[str, list[int]]]  # per layer: "attention.HxKV" -> kept heads, "mlp.N" -> kept neurons

    def reformed(self, subnet: SubNetwork) -> Mapping[tuple[int, str], torch.Tensor]:
        """The stored output projections of ``subnet``'s levels, as ``subnetwork_applied`` takes them, each
        read when it is looked up (a streamed model's as its layer is read, so never all at once).

        Refuses a candidate whose kept units are not the library's (it would get wrong weights).
        """
        places: dict[tuple[int, str], tuple[Path, str]] = {}
        for index, keep in subnet.layers.items():
            shape, stored = keep.shape, self.keeps[index]
            for name, key, kept in (
                ("attention", f"attention.{shape.heads}x{shape.kv_heads}", keep.heads),
                ("mlp", f"mlp.{shape.neurons}", keep.neurons),
            ):
                if not kept or key not in stored:  # removed, or whole (the dense weight is its own reformation)
                    if kept and len(kept) < self._full(index, name):
                        raise SlimlmError(f"layer {index}: {name} at {len(kept)} units is not a level of the library")
                    continue
                if list(kept) != stored[key]:
                    raise SlimlmError(f"layer {index}: the candidate's kept {name} units are not the library's")
                places[index, name] = (self.folder / _layer_file(index), key)
        return StoredWeights(places)

    def _full(self, index: int, name: str) -> int:
        return self.keeps[index]["full_heads" if name == "attention" else "full_neurons"][0]


def build_library(
    loaded: LoadedModel,
    importance: Importance,
    space: SearchSpace,
    windows: torch.Tensor,
    damping: float = DAMPING,
    batch_size: int = 4,
) -> VariantLibrary:
    """The library of ``loaded`` for ``space``, from its cache or built (Gram pass, then one solve per level)."""
    dims = loaded.dims
    keeps = [_layer_keeps(loaded, importance, space, i) for i in range(dims.num_layers)]
    key = {
        "format": FORMAT,
        "model": loaded.fingerprint(),
        "windows": tensor_digest(windows),
        "importance": tensor_digest(*importance.heads, *importance.kv_heads, *importance.neurons),
        "keeps": keeps,
        "damping": damping,
    }
    folder = cache_root() / "library" / hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with computed_once(folder):  # workers sharing the cache build it once; a killed build resumes per layer
        missing = [i for i in range(dims.num_layers) if not _complete(folder / _layer_file(i))]
        if missing:
            folder.mkdir(parents=True, exist_ok=True)
            _build_layers(loaded, keeps, missing, windows, damping, batch_size, folder)
    return VariantLibrary(folder, keeps)


def _layer_keeps(loaded: LoadedModel, importance: Importance, space: SearchSpace, index: int) -> dict:
    """Kept units of every level of one layer (the most important, as ``keep_most_important`` picks)."""
    dims, full = loaded.dims, loaded.dims.layers[index]
    keeps: dict[str, list[int]] = {"full_heads": [full.heads], "full_neurons": [full.neurons]}
    for a in space.attention_levels(full):
        if 0 < a.heads < full.heads:
            kept = keep_most_important(dims, importance, {index: LayerShape(a.heads, a.kv_heads, 1)}).layers[index]
            keeps[f"attention.{a.heads}x{a.kv_heads}"] = list(kept.heads)
    for n in space.mlp_levels(full):
        if 0 < n < full.neurons:
            kept = keep_most_important(dims, importance, {index: LayerShape(full.heads, full.kv_heads, n)})
            keeps[f"mlp.{n}"] = list(kept.layers[index].neurons)
    return keeps


def _layer_file(index: int) -> str:
    return f"layer-{index:04d}.safetensors"


def _complete(path: Path) -> bool:
    """A layer file that was fully written (writes go to a temporary name and are renamed when done)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # a damaged file is rebuilt, never trusted
        return False


@torch.no_grad()
def _build_layers(loaded, keeps, missing: list[int], windows, damping: float, batch_size: int, folder: Path) -> None:
    """Run the dense model a layer at a time on ``windows`` and solve each missing layer from the Gram
    matrices of its own inputs: one layer's weights and Gram matrices in memory at a time."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    hidden, kwargs = layer_inputs(loaded, windows, batch_size)
    for index in track(range(max(missing) + 1), "building the variant library"):
        with resident(loaded.model, layers[index]):  # a streamed model's layer is read once for both
            grams: dict[str, torch.Tensor] = {}
            projections = loaded.adapter.output_projections(layers[index])
            hooks = {p: _accumulate(grams, n) for n, p in zip(("attention", "mlp"), projections, strict=True)}
            hidden = layer_pass(layers[index], hidden, kwargs[index], hooks if index in missing else None)
            if index in missing:
                _write_layer(loaded, index, keeps[index], grams, damping, folder / _layer_file(index))


def _accumulate(grams: dict, name: str):
    """A pre-hook adding X Xᵀ of a projection's input to ``grams[name]`` (float32 products, float64 sums)."""

    def hook(_module, args):
        width = args[0].shape[-1]
        add_gram(grams.setdefault(name, args[0].new_zeros(width, width, dtype=torch.float64)), args[0].detach())

    return hook


@torch.no_grad()
def _write_layer(loaded: LoadedModel, index: int, keeps: dict, grams: dict, damping: float, path: Path) -> None:
    """Solve every level of one layer and write each as it is solved (atomically, to ``path``)."""
    layer = loaded.adapter.decoder_layers(loaded.model)[index]
    with resident(loaded.model, layer):  # a streamed model's layer is read for this
        o_proj, down_proj = loaded.adapter.output_projections(layer)
        # the smaller Gram matrix (usually the MLP's) is solved and freed first: the larger one's solves,
        # which peak, then have no other Gram matrix beside them
        weights = {"attention": o_proj.weight.detach().clone(), "mlp": down_proj.weight.detach().clone()}
        weights = dict(sorted(weights.items(), key=lambda item: item[1].shape[1]))
    head_dim = loaded.dims.head_dim
    width = {"attention": head_dim, "mlp": 1}  # input columns per unit
    levels = {name: [key for key in keeps if key.startswith(f"{name}.")] for name in weights}

    def solved():
        for name, weight in weights.items():
            gram = grams.pop(name)  # freed once its levels are written
            rhs = weight.double() @ gram  # W G, shared by every level of this projection
            for key in levels[name]:
                units = torch.tensor(keeps[key], dtype=torch.long)
                cols = (units[:, None] * width[name] + torch.arange(width[name])).reshape(-1)
                yield key, ridge(rhs[:, cols], gram, damping, cols).to(weight.dtype).cpu()

    shapes = {key: (weights[n].shape[0], len(keeps[key]) * width[n]) for n in weights for key in levels[n]}
    tmp = path.with_suffix(".tmp")
    _write_safetensors(tmp, shapes, loaded.model.dtype, {"format": FORMAT}, solved())
    tmp.replace(path)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(path: Path, shapes: dict, dtype: torch.dtype, metadata: dict, tensors) -> None:
    """A safetensors file of the tensors ``tensors`` yields, in the order of ``shapes`` (name -> shape),
    written one at a time: a layer's levels are several times its weights (safetensors' own writer
    would hold them all)."""
    size, header, offset = torch.empty((), dtype=dtype).element_size(), {"__metadata__": metadata}, 0
    for name, shape in shapes.items():
        end = offset + math.prod(shape) * size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for (name, tensor), (expected, shape) in zip(tensors, shapes.items(), strict=True):
            if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise SlimlmError(f"library: {name} {tuple(tensor.shape)} does not match its place {expected} {shape}")
            f.write(tensor.contiguous().view(torch.uint8).numpy())
