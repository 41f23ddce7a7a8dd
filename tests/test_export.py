"""GGUF export: what llama.cpp reads back, checked with gguf's reader and transformers' GGUF loader."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from slimlm import llamacpp
from slimlm.errors import SlimlmError
from slimlm.export import _write_gguf, export_gguf
from slimlm.extract import extract
from slimlm.gguf_tokenizer import TOKENIZER_GGUF, save_tokenizer_gguf
from slimlm.models import load_model
from slimlm.search import SearchJob, search
from slimlm.strategies import candidate, completed, stage_of
from slimlm.subnet import SubNetwork

from .conftest import FAMILIES, TEXT, fast_search_settings, for_family, invoke, one_error, save_tiny, tiny_loaded

BPE_VOCAB = 300


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained on the test text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def bpe_model(tmp_path, family: str = "llama", subnet=None, **overrides):
    """A tiny model with a BPE tokenizer saved as a folder (``subnet``: extracted to that sub-network)."""
    loaded = tiny_loaded(family, vocab_size=BPE_VOCAB, tie_word_embeddings=family != "mistral", **overrides)
    loaded.tokenizer = bpe_tokenizer()
    folder = save_tiny(loaded, tmp_path / "dense")
    if subnet is not None:
        folder = extract(load_model(folder), subnet(loaded.dims), tmp_path / "small").folder
    return load_model(folder)


def ragged(dims):
    """Layer 0 whole, layer 1 one GQA group and 32 neurons, layer 2 removed, layer 3 the other group and 8."""
    full = SubNetwork.full(dims)
    layer = full.layers[0].__class__
    return SubNetwork(
        {0: full.layers[0], 1: layer((0, 1, 2), (0,), tuple(range(32))), 3: layer((3, 4, 5), (1,), tuple(range(8)))}
    )


def gguf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


# What transformers' GGUF reader takes from defaults, not from the file, per family: a model reads back
# only where those defaults are its own. qwen3 ignores qwen3.attention.key_length (which slimlm writes, as
# llama.cpp reads it) and takes Qwen3Config's head size, 128; gemma3 takes query_pre_attn_scalar 256 and
# layer types in llama.cpp's period of six (every sixth layer full attention).
READS_BACK = {
    "qwen3": {"head_dim": 128},
    "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256, "num_hidden_layers": 6, "layer_types": None},
}


# llama.cpp has no graph for these families: export is refused in one line, before anything is written
NO_LLAMA_CPP_GRAPH = {"opt": "llama.cpp has no OPT architecture"}


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_computes_the_same_logits(tmp_path, family):
    loaded = bpe_model(tmp_path, family, **READS_BACK.get(family, {}))
    if family in NO_LLAMA_CPP_GRAPH:
        with pytest.raises(SlimlmError, match=f"^{NO_LLAMA_CPP_GRAPH[family]}"):
            export_gguf(loaded, tmp_path / "m.gguf", "f32", tokenizer_pre="default")
        assert not list(tmp_path.glob("m.*"))
        return
    exported = export_gguf(loaded, tmp_path / "m.gguf", "f32", tokenizer_pre="default")
    ids = torch.randint(0, BPE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(ids).logits
    assert torch.allclose(gguf_logits(exported.path, ids), expected, atol=1e-4)


def test_a_gemma3_gguf_loads_back_as_a_gemma3_model(tmp_path):
    loaded = bpe_model(tmp_path, "gemma3_text", **READS_BACK["gemma3_text"])
    path = export_gguf(loaded, tmp_path / "m.gguf", "f32", tokenizer_pre="default").path
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "gemma3"
    again = load_model(path)  # the architecture is accepted from the header, then dequantized into the cache
    assert again.dims == loaded.dims and again.model.config.layer_types == loaded.model.config.layer_types
    ids = torch.randint(0, BPE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_uniform_sub_network_round_trips_through_gguf(tmp_path):
    def smaller(dims):  # 2 of 3 layers, one GQA group of 3 heads, 24 of 40 neurons in each
        full = SubNetwork.full(dims)
        return SubNetwork({i: full.layers[i].__class__((0, 1, 2), (0,), tuple(range(24))) for i in (0, 2, 3)})

    loaded = bpe_model(tmp_path, subnet=smaller, hidden_size=96)  # rows of 96: whole q8_0 blocks of 32
    exported = export_gguf(loaded, tmp_path / "m.gguf", "q8_0", tokenizer_pre="default")
    ids = torch.randint(0, BPE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(ids).logits
    got = gguf_logits(exported.path, ids)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    # 3 heads of 8: the attention output's rows are not whole blocks; the 24 neurons are padded to 32
    assert set(exported.kept_f16) == {f"blk.{i}.attn_output.weight" for i in range(3)}
    assert exported.padded_neurons == 3 * 8


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_slimlms_own_ragged_gguf_reads_back_with_its_logits(tmp_path, quant):
    """A deci file (layers of their own shapes, a layer dropped) loads in slimlm as the model it was
    written from: same per-layer shapes, same tokenizer, the same logits (f32) or close (q8_0)."""
    loaded = bpe_model(tmp_path, subnet=ragged)
    path = export_gguf(loaded, tmp_path / "m.gguf", quant, tokenizer_pre="default").path
    again = load_model(path)
    padded = [s.__class__(s.heads, s.kv_heads, -(-s.neurons // 32) * 32) for s in loaded.dims.layers]
    assert tuple(again.dims.layers) == tuple(loaded.dims.layers if quant == "f32" else padded)  # q8_0: MLPs padded
    assert again.tokenizer("the quick brown fox")["input_ids"] == loaded.tokenizer("the quick brown fox")["input_ids"]
    ids = torch.randint(0, BPE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = loaded.model(ids).logits, again.model(ids).logits
    tolerance = 1e-5 if quant == "f32" else 0.05
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_layers_that_differ_are_written_as_per_layer_arrays(tmp_path):
    loaded = bpe_model(tmp_path, subnet=ragged)
    reader = gguf.GGUFReader(export_gguf(loaded, tmp_path / "m.gguf", "f16", tokenizer_pre="default").path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "deci"  # llama.cpp's llama graph sizes layers from the first
    assert field("deci.block_count") == 3
    assert field("deci.attention.head_count") == [6, 3, 3]
    assert field("deci.attention.head_count_kv") == [2, 1, 1]
    assert field("deci.feed_forward_length") == [40, 32, 8]
    assert field("deci.attention.key_length") == 8  # not hidden / first layer's heads
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.2.attn_q.weight"] == (48, 24)  # GGUF lists the inner dimension first
    assert shapes["blk.2.attn_k.weight"] == (48, 8)
    assert shapes["blk.2.ffn_down.weight"] == (8, 48)
    assert "output.weight" not in shapes  # tied: llama.cpp reads token_embd


def test_quantized_mlps_are_padded_with_zero_neurons_to_whole_blocks(tmp_path):
    loaded = bpe_model(tmp_path, hidden_size=96)  # 40 neurons per layer: not whole 32-wide blocks
    exported = export_gguf(loaded, tmp_path / "m.gguf", "q8_0", tokenizer_pre="default")
    assert exported.padded_neurons == 4 * 24 and not any("ffn" in name for name in exported.kept_f16)
    reader = gguf.GGUFReader(exported.path)
    assert reader.fields["llama.feed_forward_length"].contents() == 64
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert down.tensor_type == gguf.GGMLQuantizationType.Q8_0 and tuple(int(d) for d in down.shape) == (64, 96)
    # the zero neurons change nothing: padded but unquantized, the logits are the model's own
    exact = _write_gguf(loaded, tmp_path / "padded.gguf", "f32", "default", block=32)
    assert exact.padded_neurons == 96
    ids = torch.randint(0, BPE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(ids).logits
    assert torch.allclose(gguf_logits(exact.path, ids), expected, atol=1e-4)
    assert (gguf_logits(exported.path, ids) - expected).abs().max() < 0.02 * expected.abs().max()


def test_tokenizer_keys_of_a_gguf_source_travel_with_the_model(tmp_path):
    loaded = bpe_model(tmp_path)
    source = export_gguf(loaded, tmp_path / "source.gguf", "f16", tokenizer_pre="smollm").path
    save_tokenizer_gguf(source, loaded.folder)
    assert (loaded.folder / TOKENIZER_GGUF).is_file()
    reader = gguf.GGUFReader(export_gguf(loaded, tmp_path / "again.gguf", "f16").path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == BPE_VOCAB


def test_layers_that_differ_in_an_architecture_llama_cpp_sizes_uniformly_are_refused(tmp_path):
    with pytest.raises(SlimlmError, match="--uniform"):
        export_gguf(bpe_model(tmp_path, "qwen2", subnet=ragged), tmp_path / "m.gguf", "f16", tokenizer_pre="default")
    assert not list(tmp_path.glob("m.*"))


def keep_layers(*kept):
    """A sub-network keeping only the listed layers, whole."""
    return lambda dims: SubNetwork({i: SubNetwork.full(dims).layers[i] for i in kept})


GEMMA3_REFUSED = {  # what llama.cpp's gemma3 graph cannot run -> the nearest model the error names
    "alternating layer types": ({}, None, "--no-depth"),
    "a dropped first layer": (READS_BACK["gemma3_text"], keep_layers(1, 2, 3, 4, 5), "--no-depth"),
    "another attention scale": (READS_BACK["gemma3_text"] | {"query_pre_attn_scalar": 64}, None, "1/sqrt"),
    "layers that differ": (READS_BACK["gemma3_text"], ragged, "--uniform"),
}


@pytest.mark.parametrize("case", GEMMA3_REFUSED)
def test_gemma3_models_llama_cpp_would_compute_otherwise_are_refused_in_one_line(tmp_path, case):
    overrides, subnet, nearest = GEMMA3_REFUSED[case]
    folder = bpe_model(tmp_path, "gemma3_text", subnet=subnet, **overrides).folder
    error = one_error(invoke("export", folder, "--gguf", tmp_path / "m.gguf", "--tokenizer-pre", "default"))
    assert "llama.cpp" in error and nearest in error
    assert not list(tmp_path.glob("m.*"))


def fewer_neurons_and_layers(dims):
    """Layers 0, 2 and 3 with every attention head and 24 of 40 MLP neurons: what llama.cpp's phi3 graph runs."""
    full = SubNetwork.full(dims).layers
    return SubNetwork({i: full[i].__class__(full[i].heads, full[i].kv_heads, tuple(range(24))) for i in (0, 2, 3)})


def test_phi3_writes_fused_tensors_and_pads_each_half_of_gate_up(tmp_path):
    # head size 16: the 6 query heads fill the hidden size (96: whole q8_0 blocks), as llama.cpp's phi3 graph needs
    loaded = bpe_model(tmp_path, "phi3", subnet=fewer_neurons_and_layers, hidden_size=96, head_dim=16)
    exact = _write_gguf(loaded, tmp_path / "padded.gguf", "f32", "default", block=32)  # 24 neurons padded to 32
    assert exact.padded_neurons == 3 * 8
    reader = gguf.GGUFReader(exact.path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "phi3"
    assert (field("phi3.feed_forward_length"), field("phi3.attention.head_count_kv")) == (32, 2)
    assert (field("phi3.rope.dimension_count"), field("phi3.attention.sliding_window")) == (16, 0)
    tensors = {t.name: t for t in reader.tensors}
    assert tuple(int(d) for d in tensors["blk.0.attn_qkv.weight"].shape) == (96, 96 + 2 * 2 * 16)
    gate_up = np.asarray(tensors["blk.0.ffn_up.weight"].data)
    weight = loaded.model.model.layers[0].mlp.gate_up_proj.weight.detach().numpy()
    assert gate_up.shape == (64, 96)  # gate rows 0-23, 8 zero rows, up rows 32-55, 8 zero rows
    assert np.array_equal(gate_up[:24], weight[:24]) and np.array_equal(gate_up[32:56], weight[24:])
    assert not gate_up[24:32].any() and not gate_up[56:].any()
    ids = torch.randint(0, BPE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(ids).logits
    assert torch.allclose(gguf_logits(exact.path, ids), expected, atol=1e-4)  # the zero neurons change nothing
    quantized = export_gguf(loaded, tmp_path / "m.gguf", "q8_0", tokenizer_pre="default")
    assert not quantized.kept_f16
    assert (gguf_logits(quantized.path, ids) - expected).abs().max() < 0.05 * expected.abs().max()


def test_phi3_partial_rotary_writes_the_rotated_dimensions(tmp_path):
    loaded = bpe_model(tmp_path, "phi3", partial_rotary_factor=0.5)
    reader = gguf.GGUFReader(export_gguf(loaded, tmp_path / "m.gguf", "f32", tokenizer_pre="default").path)
    assert reader.fields["phi3.rope.dimension_count"].contents() == 4  # half of each head of 8


PHI3_REFUSED = {  # what llama.cpp's phi3 graph cannot run -> what the error names
    "layers that differ": (ragged, "--uniform"),
    "pruned query heads": (
        lambda dims: SubNetwork(
            {i: SubNetwork.full(dims).layers[0].__class__((0, 1, 2), (0,), range(40)) for i in range(4)}
        ),
        "keeps every attention head",
    ),
}


@pytest.mark.parametrize("case", PHI3_REFUSED)
def test_phi3_models_llama_cpp_cannot_run_are_refused_in_one_line(tmp_path, case):
    subnet, nearest = PHI3_REFUSED[case]
    folder = bpe_model(tmp_path, "phi3", subnet=subnet).folder
    error = one_error(invoke("export", folder, "--gguf", tmp_path / "m.gguf", "--tokenizer-pre", "default"))
    assert "llama.cpp" in error and "phi3" in error and nearest in error
    assert not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("quant", ["f16", "q4_k"])  # the k-quants: refused before llama.cpp is looked for
def test_opt_is_refused_in_one_line_whatever_its_shape_and_type(tmp_path, quant):
    folder = bpe_model(tmp_path, "opt", subnet=lambda dims: for_family(ragged(dims), "opt")).folder  # slimlm's own
    error = one_error(invoke("export", folder, "--gguf", tmp_path / "m.gguf", "--quant", quant, "--tokenizer-pre", "x"))
    assert error == (
        "error: llama.cpp has no OPT architecture (learned positions, ReLU MLP without a gate), so an OPT model "
        "does not export to GGUF; use the extracted Hugging Face folder"
    )
    assert not list(tmp_path.glob("m.*"))


def test_gemma3_without_its_trailing_layers_keeps_llama_cpps_layer_types(tmp_path):
    loaded = bpe_model(tmp_path, "gemma3_text", subnet=keep_layers(0, 1, 2, 3), **READS_BACK["gemma3_text"])
    path = export_gguf(loaded, tmp_path / "m.gguf", "f32", tokenizer_pre="default").path
    ids = torch.randint(0, BPE_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(gguf_logits(path, ids), loaded.model(ids).logits, atol=1e-4)


def test_unknown_pre_tokenizer_and_bad_names_are_clear_errors(tmp_path):
    loaded = bpe_model(tmp_path)
    with pytest.raises(SlimlmError, match="--tokenizer-pre"):
        export_gguf(loaded, tmp_path / "m.gguf", "f16")
    with pytest.raises(SlimlmError, match="q8_0"):
        export_gguf(loaded, tmp_path / "m.gguf", "q3", tokenizer_pre="default")
    with pytest.raises(SlimlmError, match=r"\.gguf"):
        export_gguf(loaded, tmp_path / "m.bin", "f16", tokenizer_pre="default")
    assert not list(tmp_path.glob("m.*"))


def test_interleaving_matches_the_rotary_pairs():
    from slimlm.export import _interleave_rotary_halves

    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # one head of 8: halves [0..3], [4..7]
    assert _interleave_rotary_halves(rows, 8).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_cli_export_writes_the_file_and_names_what_stayed_f16(tmp_path):
    folder = bpe_model(tmp_path).folder
    result = invoke(
        "export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--quant", "q8_0", "--tokenizer-pre", "default"
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "kept in f16" in result.output
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    error = one_error(invoke("export", str(folder), "--gguf", str(tmp_path / "n.gguf")))
    assert "--tokenizer-pre" in error


needs_llama_cpp = pytest.mark.skipif(
    not llamacpp.available(),
    reason="llama.cpp (xllamacpp) is not installed (optional extra: pip install '.[llamacpp]')",
)


@needs_llama_cpp
def test_the_structures_mirror_the_pinned_llama_cpp():
    """llama.cpp's own defaults read through slimlm's copies of its structures: another layout misreads them."""
    lib = llamacpp.require()
    model, context = lib.llama_model_default_params(), lib.llama_context_default_params()
    assert (model.n_gpu_layers, model.use_mmap, model.vocab_only, model.no_alloc) == (-1, True, False, False)
    assert (context.n_ctx, context.n_batch, context.n_ubatch, context.n_seq_max) == (512, 2048, 512, 1)
    assert (context.type_k, context.type_v, context.yarn_ext_factor) == (1, 1, -1.0)  # f16 cache; from the model
    assert (context.embeddings, context.offload_kqv, context.samplers, context.n_samplers) == (False, True, None, 0)


def test_another_llama_cpp_release_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp.importlib.metadata, "version", lambda name: "0.0.1")
    with pytest.raises(SlimlmError, match=f"xllamacpp=={llamacpp.PINNED} ships it, found 0.0.1"):
        llamacpp.require()


@pytest.fixture
def without_llama_cpp(monkeypatch):
    """What a user without the llamacpp extra sees."""
    monkeypatch.setattr(llamacpp, "available", lambda: False)


def assert_llama_cpp_logits(loaded, tmp_path) -> None:
    """llama.cpp computes ``loaded``'s logits from its f32 GGUF export."""
    path = export_gguf(loaded, tmp_path / "m.gguf", "f32", tokenizer_pre="default").path
    ids = torch.randint(0, BPE_VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(ids).logits[0].numpy()
    got = llamacpp.logits(path, ids[0].tolist())
    assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_llama_cpp_computes_the_logits_of_the_extracted_model(tmp_path, family):
    loaded = bpe_model(tmp_path, family, subnet=ragged)
    assert_llama_cpp_logits(loaded, tmp_path)


def sub_blocks_removed(dims):
    """Layer 0 without attention (llama.cpp sizes heads from the first layer), layer 1 without its MLP
    (llama.cpp's deci graph then skips the attention too), layer 2 dropped, layer 3 narrower."""
    full = SubNetwork.full(dims)
    layer = full.layers[0].__class__
    return SubNetwork(
        {0: layer((), (), tuple(range(40))), 1: layer((0, 1, 2), (0,), ()), 3: layer((3, 4, 5), (1,), tuple(range(8)))}
    )


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_llama_cpp_computes_a_model_with_sub_blocks_removed(tmp_path, quant):
    """Written back as zero sub-blocks where llama.cpp needs them (they add exactly nothing)."""
    loaded = bpe_model(tmp_path, subnet=sub_blocks_removed)
    exported = export_gguf(loaded, tmp_path / "m.gguf", quant, tokenizer_pre="default")
    reader = gguf.GGUFReader(exported.path)
    assert reader.fields["deci.attention.head_count"].contents() == [1, 3, 3]  # a zero head in layer 0
    assert reader.fields["deci.feed_forward_length"].contents()[1] == (1 if quant == "f32" else 32)  # zero MLP
    ids = torch.randint(0, BPE_VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(ids).logits[0].numpy()
    got = llamacpp.logits(exported.path, ids[0].tolist())
    tolerance = 1e-3 if quant == "f32" else 0.02
    assert np.abs(got - expected).max() < tolerance * max(1.0, np.abs(expected).max())
    again = load_model(exported.path)  # slimlm reads the zero sub-blocks back: the same function
    with torch.no_grad():
        assert np.abs(again.model(ids).logits[0].numpy() - got).max() < tolerance * max(1.0, np.abs(expected).max())


@needs_llama_cpp
def test_llama_cpp_computes_the_logits_of_a_gemma3_export(tmp_path):
    """llama.cpp's gemma3 graph: norms of 1 + weight, every sixth layer full attention, sliding window 4."""
    loaded = bpe_model(tmp_path, "gemma3_text", **READS_BACK["gemma3_text"])
    assert_llama_cpp_logits(loaded, tmp_path)


@needs_llama_cpp
def test_llama_cpp_computes_the_logits_of_a_phi3_export(tmp_path):
    """llama.cpp's phi3 graph: fused attn_qkv split at the hidden size, ffn_up halved into gate and up."""
    loaded = bpe_model(tmp_path, "phi3", subnet=fewer_neurons_and_layers)
    assert_llama_cpp_logits(loaded, tmp_path)


@needs_llama_cpp
def test_llama_cpp_runs_padded_quantized_layers_that_differ(tmp_path):
    loaded = bpe_model(tmp_path, subnet=ragged)  # 40, 32 and 8 neurons: two layers padded to 64 and 32
    exported = export_gguf(loaded, tmp_path / "m.gguf", "q8_0", tokenizer_pre="default")
    assert exported.padded_neurons == 24 + 24 and "blk.0.ffn_down.weight" not in exported.kept_f16
    ids = torch.randint(0, BPE_VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(ids).logits[0].numpy()
    got = llamacpp.logits(exported.path, ids[0].tolist())
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


@needs_llama_cpp
def test_k_quant_is_encoded_by_ggml_and_stays_close(tmp_path):
    """Rows of whole 256-blocks in the k-type, the tied output in Q6_K, narrower rows in llama.cpp's fallback."""
    loaded = bpe_model(tmp_path, hidden_size=256, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    path = export_gguf(loaded, tmp_path / "m.gguf", "q4_k", tokenizer_pre="default").path
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_K and tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q4_K
    assert tensors["token_embd.weight"].tensor_type == Q.Q6_K  # tied: it is the output matrix too
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.Q5_0  # rows of 96
    weight = loaded.model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    decoded = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, Q.Q4_K)
    assert np.abs(decoded - weight).max() < 0.1 * np.abs(weight).max()  # ggml's bytes decode as Q4_K
    ids = list(range(1, 17))
    dequantized = gguf_logits(path, torch.tensor([ids]))[0].numpy()  # transformers on the decoded weights
    got = llamacpp.logits(path, ids)
    assert np.abs(got - dequantized).max() < 0.03 * np.abs(dequantized).max()
    (speed,) = llamacpp.compare_speed([path], prompt_tokens=16, new_tokens=4, repeats=1)
    assert speed.prompt_tokens_per_s > 0 and speed.generation_tokens_per_s > 0


@needs_llama_cpp
def test_cli_bench_in_llama_cpp_compares_two_files(tmp_path):
    dense = export_gguf(bpe_model(tmp_path / "a"), tmp_path / "dense.gguf", "f16", tokenizer_pre="default").path
    small = bpe_model(tmp_path / "b", subnet=ragged)
    smaller = export_gguf(small, tmp_path / "small.gguf", "f16", tokenizer_pre="default").path
    args = ("bench", smaller, "--vs", dense, "--runtime", "llama.cpp", "--prompt-tokens", "16", "--new-tokens", "4")
    result = invoke(*args, "--repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ratios"]["file_size"] < 1
    assert all(m["generation_tokens_per_s"] > 0 for m in report["models"])


@pytest.mark.usefixtures("without_llama_cpp")
def test_llama_cpp_features_without_it_say_how_to_install(tmp_path):
    path = export_gguf(bpe_model(tmp_path), tmp_path / "m.gguf", "f16", tokenizer_pre="default").path
    error = one_error(invoke("bench", path, "--vs", path, "--runtime", "llama.cpp"))
    assert "pip install" in error
    error = one_error(invoke("export", tmp_path / "dense", "--gguf", tmp_path / "k.gguf", "--quant", "q4_k"))
    assert "llama.cpp is not installed" in error


@needs_llama_cpp
def test_llama_cpp_perplexity_equals_the_hugging_face_one(tmp_path):
    from slimlm.evaluate import perplexity

    loaded = bpe_model(tmp_path)
    path = export_gguf(loaded, tmp_path / "m.gguf", "f32", tokenizer_pre="default").path
    windows = torch.randint(0, BPE_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    assert llamacpp.perplexity(path, windows) == pytest.approx(perplexity(loaded.model, windows), rel=1e-3)


@needs_llama_cpp
def test_a_corrupt_gguf_is_a_clear_error_in_llama_cpp(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(SlimlmError, match=r"cannot load .*: gguf_init_from_file_ptr: bad GGUF version"):
        llamacpp.logits(path, [1, 2, 3])


def test_a_model_loaded_from_a_gguf_exports_with_its_source_tokenizer_keys(tmp_path):
    source = export_gguf(bpe_model(tmp_path), tmp_path / "source.gguf", "f32", tokenizer_pre="smollm").path
    loaded = load_model(source)  # dequantized into the cache, which keeps the tokenizer keys
    reader = gguf.GGUFReader(export_gguf(loaded, tmp_path / "again.gguf", "f16").path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"


def latency_job(tmp_path, text) -> SearchJob:
    return SearchJob(
        model=str(bpe_model(tmp_path, hidden_size=96).folder),
        out=str(tmp_path / "run"),
        params_fraction=0.6,
        objective="latency",
        latency_runtime="llama.cpp",
        evaluations=4,
        **fast_search_settings(text),
    )


@needs_llama_cpp
def test_search_prices_latency_in_llama_cpp(tmp_path, text, monkeypatch):
    """Candidates are priced by a latency model fitted on sub-networks timed in llama.cpp."""
    for name, value in (("SAMPLES", 6), ("CHECKS", 2), ("ROUNDS", 2)):  # each an export and timed rounds
        monkeypatch.setattr(f"slimlm.latency.{name}", value)
    searcher, study = search(latency_job(tmp_path, text))
    latencies = [t.values[1] for t in completed(study)]
    assert sum(stage_of(t) == 0 for t in completed(study)) == 4  # and the survivors' rescores
    assert all(0 < ms < 1000 for ms in latencies)
    assert all(t.user_attrs["latency_ms"] == searcher.latency.ms(candidate(t).shapes()) for t in completed(study))
    assert 0 < searcher.latency.dense_ms < 1000 and all(math.isfinite(e) for e in searcher.latency.check_errors)
    assert not list((tmp_path / "run").glob("*.gguf")) and not list(
        Path(tempfile.gettempdir()).glob("slimlm-latency-*")
    )


@pytest.mark.usefixtures("without_llama_cpp")
def test_latency_in_llama_cpp_without_it_is_refused_before_any_store(tmp_path, text):
    with pytest.raises(SlimlmError, match=r"llama\.cpp is not installed"):
        search(latency_job(tmp_path, text))
    assert not (tmp_path / "run").exists()
