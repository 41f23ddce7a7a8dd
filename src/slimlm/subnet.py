"""A sub-network: which layers, query heads, key/value heads and MLP neurons of a model to keep.

It is a plain value, saved as JSON::

    {"format": "slimlm.subnetwork/1",
     "layers": {"0": {"heads": [0, 1, 3, 4], "kv_heads": [0, 1], "neurons": [0, 5, 17, ...]},
                "2": {...}}}

Files slimlm writes also say which model they were made for (``"model"``: the weights' fingerprint
and the full model's layer shapes), and loading one for another model is refused unless asked for.

Keys of ``layers`` are indices into the full model; a layer not listed is removed. Indices refer to
the full model's units. A layer may also lose one sub-block only: empty ``heads`` and ``kv_heads``
remove its attention, empty ``neurons`` its MLP (BlockPruner-style sub-block removal).

Query head ``h`` belongs to key/value head ``h // group_size``; a kept query
head needs its key/value head, and every kept key/value head keeps the same number of query heads,
so the result is again a standard grouped-query attention layer.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.models.base import LayerShape, ModelDims

FORMAT = "slimlm.subnetwork/1"


@dataclass(frozen=True)
class LayerKeep:
    """Kept unit indices of one decoder layer (sorted, unique)."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    neurons: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "neurons"):
            object.__setattr__(self, name, tuple(sorted({int(i) for i in getattr(self, name)})))

    @property
    def shape(self) -> LayerShape:
        return LayerShape(len(self.heads), len(self.kv_heads), len(self.neurons))

    @classmethod
    def full(cls, shape: LayerShape) -> LayerKeep:
        """Every unit of a layer of ``shape``."""
        return cls(tuple(range(shape.heads)), tuple(range(shape.kv_heads)), tuple(range(shape.neurons)))


@dataclass(frozen=True)
class SubNetwork:
    """Kept layers of a model, by index into the full model, each with its kept units."""

    layers: dict[int, LayerKeep]

    @classmethod
    def full(cls, dims: ModelDims) -> SubNetwork:
        """The sub-network that keeps everything."""
        return cls({i: LayerKeep.full(s) for i, s in enumerate(dims.layers)})

    @property
    def kept_layers(self) -> list[int]:
        return sorted(self.layers)

    def shapes(self) -> list[LayerShape]:
        """Shapes of the kept layers, in model order."""
        return [self.layers[i].shape for i in self.kept_layers]

    def describe(self, num_layers: int) -> str:
        """One readable line, ``layer:heads/kv_heads/neurons`` per layer and ``layer:-`` for a removed
        one (``0:9/3/1536 1:- 2:0/0/1280``: layer 1 removed, layer 2's attention removed)."""
        parts = []
        for i in range(num_layers):
            shape = self.layers[i].shape if i in self.layers else None
            parts.append(f"{i}:{shape.heads}/{shape.kv_heads}/{shape.neurons}" if shape else f"{i}:-")
        return " ".join(parts)

    def validate(self, dims: ModelDims) -> SubNetwork:
        """Check the sub-network fits ``dims``; raise SlimlmError naming the first problem."""
        if not self.layers:
            raise SlimlmError("sub-network keeps no layers")
        for index, keep in self.layers.items():
            if not 0 <= index < dims.num_layers:
                raise SlimlmError(f"sub-network layer {index} is out of range: the model has {dims.num_layers}")
            _validate_layer(index, keep, dims.layers[index])
        return self

    def to_json(self, made_for: dict | None = None) -> dict:
        """The JSON form; ``made_for`` (see ``model_record``) says which model the indices refer to."""
        return {
            "format": FORMAT,
            **({"model": made_for} if made_for else {}),
            "layers": {
                str(i): {"heads": list(k.heads), "kv_heads": list(k.kv_heads), "neurons": list(k.neurons)}
                for i, k in sorted(self.layers.items())
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> SubNetwork:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SlimlmError(f'not a slimlm sub-network: expected "format": "{FORMAT}"')
        try:
            layers = {_index(i, "layer"): k for i, k in data["layers"].items()}
            return cls(
                {
                    i: LayerKeep(*([_index(u, name) for u in k[name]] for name in ("heads", "kv_heads", "neurons")))
                    for i, k in layers.items()
                }
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise SlimlmError(f"malformed sub-network: {type(error).__name__}: {error}") from error

    def to_compact(self) -> str:
        """A short string form (kept sets as hex bitmasks) for search stores holding many candidates."""
        return json.dumps(
            {str(i): [_bits(k.heads), _bits(k.kv_heads), _bits(k.neurons)] for i, k in sorted(self.layers.items())},
            separators=(",", ":"),
        )

    @classmethod
    def from_compact(cls, text: str) -> SubNetwork:
        return cls({int(i): LayerKeep(*(_indices(m) for m in masks)) for i, masks in json.loads(text).items()})

    def save(self, path: str | Path, made_for: dict | None = None) -> None:
        Path(path).write_text(json.dumps(self.to_json(made_for), separators=(",", ":")) + "\n")

    @classmethod
    def load(
        cls, path: str | Path, dims: ModelDims | None = None, fingerprint: str = "", foreign: bool = False
    ) -> SubNetwork:
        """Read a sub-network file. Given the model it is for (``dims`` and weights ``fingerprint``),
        refuse a file made for another model, or one that does not say, unless ``foreign``; the
        indices are checked against ``dims`` either way."""
        path = Path(path)
        if not path.is_file():
            raise SlimlmError(f"sub-network file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SlimlmError(f"{path} is not valid JSON: {error}") from error
        subnet = cls.from_json(data)
        if dims is not None:
            if not foreign:
                _check_made_for(path, data.get("model"), model_record(dims, fingerprint))
            subnet.validate(dims)
        return subnet


def model_record(dims: ModelDims, fingerprint: str) -> dict:
    """What a sub-network file records of the model its indices refer to."""
    return {
        "fingerprint": fingerprint,
        "family": dims.family,
        "hidden_size": dims.hidden_size,
        "layers": [[s.heads, s.kv_heads, s.neurons] for s in dims.layers],
    }


def _check_made_for(path: Path, stored, model: dict) -> None:
    override = "pass --foreign-subnet to use it anyway"
    if not isinstance(stored, dict):
        raise SlimlmError(f"{path} does not say which model it was made for (hand-written?); {override}")
    if stored.get("layers") != model["layers"] or stored.get("hidden_size") != model["hidden_size"]:
        theirs = len(stored.get("layers") or [])
        raise SlimlmError(
            f"{path} was made for a model of another shape ({theirs} layers, hidden size "
            f"{stored.get('hidden_size')}), not this one ({len(model['layers'])} layers, hidden size "
            f"{model['hidden_size']}); {override}"
        )
    if stored.get("fingerprint") != model["fingerprint"]:
        raise SlimlmError(
            f"{path} was made for other weights of the same shape (fingerprint {str(stored.get('fingerprint'))[:12]}, "
            f"this model {model['fingerprint'][:12]}); {override}"
        )


def _index(value, what: str) -> int:
    """A unit or layer index: a JSON integer (a layer key: its decimal string), nothing else."""
    if what == "layer" and isinstance(value, str) and value.isdecimal():
        return int(value)
    if type(value) is not int:  # not bool, not 1.7, not "5"
        raise SlimlmError(f"malformed sub-network: {what} index {value!r} is not an integer")
    return value


def _bits(indices: tuple[int, ...]) -> str:
    return format(sum(1 << i for i in indices), "x")


def _indices(mask: str) -> list[int]:
    value = int(mask, 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def _validate_layer(index: int, keep: LayerKeep, full: LayerShape) -> None:
    where = f"sub-network layer {index}"
    if not keep.heads and not keep.neurons:
        raise SlimlmError(f"{where} keeps neither attention nor MLP; leave the layer out to remove it")
    if bool(keep.heads) != bool(keep.kv_heads):
        raise SlimlmError(f"{where}: heads and kv_heads must be both empty (attention removed) or both kept")
    for name, kept, total in (
        ("heads", keep.heads, full.heads),
        ("kv_heads", keep.kv_heads, full.kv_heads),
        ("neurons", keep.neurons, full.neurons),
    ):
        bad = [i for i in kept if not 0 <= i < total]
        if bad:
            raise SlimlmError(f"{where}: {name} index {bad[0]} out of range (the layer has {total})")
    per_kv = Counter(h // full.group_size for h in keep.heads)
    orphans = sorted(set(per_kv) - set(keep.kv_heads))
    if orphans:
        head = next(h for h in keep.heads if h // full.group_size == orphans[0])
        raise SlimlmError(f"{where}: query head {head} is kept without its key/value head {orphans[0]}")
    unused = sorted(set(keep.kv_heads) - set(per_kv))
    if unused:
        raise SlimlmError(f"{where}: key/value head {unused[0]} is kept with no query head")
    if len(set(per_kv.values())) > 1:
        counts = ", ".join(f"kv {g}: {n}" for g, n in sorted(per_kv.items()))
        raise SlimlmError(f"{where}: every kept key/value head must keep the same number of query heads ({counts})")
