"""What slimlm needs to know about a model family: its dimensions and where its units live.

An adapter describes one family's decoder layers (which rows and columns of which projections
make up a query head, a key/value head, an MLP neuron) so that the rest of slimlm (applying
sub-networks, costs, extraction) stays family-agnostic. Adding a family is one adapter module
plus one line in ``slimlm.models.ADAPTERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from slimlm.models.remote import modeling_slimlm as remote

if TYPE_CHECKING:
    import gguf
    import numpy as np


@dataclass(frozen=True)
class LayerShape:
    """How many query heads, key/value heads and MLP neurons one decoder layer has."""

    heads: int
    kv_heads: int
    neurons: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA group size); 0 when the attention sub-block is removed."""
        return self.heads // self.kv_heads if self.kv_heads else 0

    @property
    def has_attention(self) -> bool:
        return self.heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.neurons > 0


@dataclass(frozen=True)
class ModelDims:
    """The structure of a loaded model and the parameter cost of each structural unit.

    Costs are linear in the units, so a sub-network's size is computed without touching weights:
    ``params = outside + sum(layer_params(shape))``. A layer's attention or MLP sub-block may be
    removed (0 heads, or 0 neurons): it then also drops the fixed parameters of that sub-block.
    """

    family: str
    hidden_size: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    layers: tuple[LayerShape, ...]
    params_per_head: int  # query rows, output-projection columns, their biases
    params_per_kv_head: int  # key and value rows and biases
    params_per_neuron: int  # MLP rows and columns and biases
    params_per_attention: int  # what an attention sub-block keeps whatever its heads (its norm, output bias)
    params_per_mlp: int  # what an MLP sub-block keeps whatever its neurons (its norm, output bias)
    params_outside_layers: int  # embeddings, final norm, untied LM head
    embedding_params: int  # input embeddings (and an untied LM head)
    weights_per_head: int  # matmul weight elements per unit, for FLOPs
    weights_per_kv_head: int
    weights_per_neuron: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_params(self, shape: LayerShape) -> int:
        """Parameters of one decoder layer of ``shape`` (the one place this formula lives)."""
        attention = (
            self.params_per_attention + shape.heads * self.params_per_head + shape.kv_heads * self.params_per_kv_head
        )
        mlp = self.params_per_mlp + shape.neurons * self.params_per_neuron
        return attention * shape.has_attention + mlp * shape.has_mlp


@dataclass
class LinearSlice:
    """Keep ``rows`` (output features) and ``cols`` (input features) of one linear; None keeps all."""

    linear: nn.Linear
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


@dataclass(frozen=True)
class CoupledWeight:
    """A linear whose rows (``axis`` 0) or columns (1) come in groups of ``width``, one per ``unit``.

    ``unit`` is "heads", "kv_heads" or "neurons": removing unit k removes features
    ``offset + [k*width, (k+1)*width)``. ``offset`` is the first feature of the block of groups inside
    a fused weight (Phi-3's ``qkv_proj`` holds query rows, then key rows from ``offset`` = heads * head
    size, then value rows); a linear may then appear in several coupled weights, one per block.
    """

    linear: nn.Linear
    axis: int
    unit: str
    width: int
    offset: int = 0


class Adapter:
    """Family-specific knowledge behind one small interface. Subclass it for a new family."""

    #: ``config.architectures`` names this adapter handles.
    architectures: tuple[str, ...] = ()
    #: per sub-block ("attention" | "mlp"): its norms, then its module, as the layer's attribute names
    sub_blocks: ClassVar[dict[str, tuple[str, ...]]]

    def config_refusal(self, config: PretrainedConfig) -> str | None:
        """Why slimlm cannot prune a model of this config although it is of this family (one sentence),
        or None: checked when the adapter is chosen, before any weights load."""
        return None

    def dims(self, model: PreTrainedModel) -> ModelDims:
        """The model's structure, read from its modules (so heterogeneous models work too)."""
        raise NotImplementedError

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The decoder layers in order."""
        raise NotImplementedError

    def set_decoder_layers(self, model: PreTrainedModel, layers: nn.ModuleList) -> None:
        """Replace the decoder layers (to drop some of them)."""
        raise NotImplementedError

    def coupled_weights(self, layer: nn.Module) -> list[CoupledWeight]:
        """Every linear of a layer whose rows or columns belong to structural units, and to which."""
        raise NotImplementedError

    def layer_slices(
        self, layer: nn.Module, heads: torch.Tensor, kv_heads: torch.Tensor, neurons: torch.Tensor
    ) -> list[LinearSlice]:
        """Which rows/columns of which linears to keep for the given kept unit indices.

        One slice per linear: the blocks of a fused weight (query, key and value rows of one ``qkv_proj``)
        are one selection, their kept features in the order the coupled weights list them.
        """
        kept = {"heads": heads, "kv_heads": kv_heads, "neurons": neurons}
        features: dict[int, tuple[nn.Linear, list[list[torch.Tensor]]]] = {}  # id(linear) -> (linear, [rows, cols])
        for c in self.coupled_weights(layer):
            device = c.linear.weight.device  # index_select wants its indices where the weight is
            block = c.offset + (kept[c.unit][:, None] * c.width + torch.arange(c.width)).reshape(-1)
            features.setdefault(id(c.linear), (c.linear, [[], []]))[1][c.axis].append(block.to(device))
        return [
            LinearSlice(linear, *(torch.cat(pieces) if pieces else None for pieces in axes))
            for linear, axes in features.values()
        ]

    def output_projections(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear | None]:
        """The linears whose input columns are the attention heads' and the MLP neurons' outputs
        (None for a sub-block the layer no longer has)."""
        raise NotImplementedError

    def sub_block_attributes(self, name: str) -> tuple[str, ...]:
        """Attributes of a decoder layer that removing its ``name`` sub-block ("attention" | "mlp") replaces."""
        return self.sub_blocks[name]

    def remove_sub_block(self, layer: nn.Module, name: str, position: int) -> None:
        """Replace a layer's ``name`` sub-block by one that adds nothing to the residual stream."""
        remote.remove_sub_block(layer, name, position, layer.self_attn.head_dim, self.sub_blocks)

    def residual_branches(self, layer: nn.Module) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
        """The layer as ``h + attention(h, **layer_kwargs)`` then ``h + mlp(h)``: the two branch functions."""
        raise NotImplementedError

    def branch_output(self, layer: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """What the ``name`` branch ("attention" | "mlp") does to its output projection's result before the
        residual add: nothing in most families (Gemma-3 normalizes it)."""
        return _unchanged

    def branches_add_linearly(self) -> bool:
        """Whether each branch's output projection result is added to the residual stream as it is (the
        family has no ``branch_output`` of its own)."""
        return type(self).branch_output is Adapter.branch_output

    def layer_attributes(self, layer: nn.Module) -> list[tuple[object, str]]:
        """Plain attributes of a layer that depend on its shape or position (saved and restored)."""
        raise NotImplementedError

    def configure_layer(self, layer: nn.Module, shape: LayerShape, position: int) -> None:
        """Set those attributes for a layer of ``shape`` sitting at ``position`` in the model."""
        raise NotImplementedError

    def model_attributes(self, model: PreTrainedModel) -> list[tuple[object, str]]:
        """Model-level attributes that depend on which layers are kept (saved and restored)."""
        raise NotImplementedError

    def configure_model(self, model: PreTrainedModel, kept_layers: list[int]) -> None:
        """Set those attributes for a model keeping ``kept_layers`` (indices into the full model)."""
        raise NotImplementedError

    def extracted_config(
        self, config: PretrainedConfig, kept_layers: list[int], shapes: list[LayerShape], output_bias: bool = False
    ) -> PretrainedConfig:
        """The config of a standalone model with these layers: stock when uniform, else slimlm's own.

        ``output_bias``: the attention and MLP output projections carry biases (slimlm's own config).
        """
        raise NotImplementedError

    def gguf_refusal(self, model: PreTrainedModel) -> str | None:
        """Why llama.cpp's graph for this family would compute something other than ``model`` (one
        sentence naming the nearest model it can run), or None when it can run it."""
        return None

    def gguf_hyperparameters(self, writer: gguf.GGUFWriter, model: PreTrainedModel) -> None:
        """Write the family's own GGUF keys (beyond the sizes every family has)."""

    def gguf_tensor(self, name: str, data: np.ndarray) -> np.ndarray:
        """The tensor ``name`` (a Hugging Face state-dict name) as llama.cpp stores it."""
        return data


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
