"""Model families slimlm understands, and loading a model from a name, folder or GGUF file."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from slimlm.errors import SlimlmError
from slimlm.models.base import Adapter, CoupledWeight, LayerShape, LinearSlice, ModelDims
from slimlm.models.gemma3 import Gemma3Adapter
from slimlm.models.llama import FAMILIES, LlamaFamilyAdapter
from slimlm.models.opt import OPTAdapter
from slimlm.models.phi3 import Phi3Adapter
from slimlm.models.remote import modeling_slimlm as remote

# model_type -> adapter. A new family is one adapter module and one entry here.
ADAPTERS: dict[str, Adapter] = {
    adapter.family: adapter
    for adapter in [*(LlamaFamilyAdapter(family) for family in FAMILIES), Gemma3Adapter(), Phi3Adapter(), OPTAdapter()]
}

# slimlm's own heterogeneous models load in slimlm without trust_remote_code.
for _adapter in list(ADAPTERS.values()):
    _config, _model = _adapter.classes.slim_config, getattr(remote, _adapter.classes.slim_model)
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
    ADAPTERS[_config.model_type] = _adapter


def adapter_for(config: PretrainedConfig) -> Adapter:
    """The adapter for a model config, or a clear error naming what is supported (or why not this config)."""
    adapter = adapter_named(config.model_type, config.architectures)
    refusal = adapter.config_refusal(config)
    if refusal is not None:
        raise SlimlmError(refusal)
    return adapter


def adapter_named(model_type: str | None, architectures: list[str] | None = None) -> Adapter:
    """The adapter for a ``model_type`` (as ``config.json`` names it), or a clear error naming what is supported."""
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        names = ", ".join(architectures or []) or "no architectures listed"
        supported = ", ".join(sorted(k for k in ADAPTERS if not k.startswith("slimlm_")))
        raise SlimlmError(f"unsupported architecture '{model_type}' ({names}); slimlm supports: {supported}")
    return adapter


from slimlm.models.loading import BUILTIN_MODELS, LoadedModel, load_model, resolve_model  # noqa: E402

__all__ = [
    "ADAPTERS",
    "BUILTIN_MODELS",
    "Adapter",
    "CoupledWeight",
    "LayerShape",
    "LinearSlice",
    "LoadedModel",
    "ModelDims",
    "adapter_for",
    "adapter_named",
    "load_model",
    "resolve_model",
]
