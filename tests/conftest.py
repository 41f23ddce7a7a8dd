"""Tiny random models of every supported family, built in the test: no download needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from typer.testing import CliRunner

from slimlm.cli import app
from slimlm.models import LoadedModel, adapter_for

from .postgres import MISSING, server_bin, throwaway_cluster

VOCAB = 96
# every supported family; each test runs on all
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "opt"]
WORDS = [f"w{i}" for i in range(VOCAB - 1)]
TEXT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(4000))


def invoke(*args):
    """Run the ``slimlm`` command line in-process with ``args`` (paths welcome)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    """Assert ``result`` is a clean failure (exit 1, one ``error:`` line on stderr, no traceback); return it."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if "error:" in line]
    assert len(lines) == 1, result.output
    assert lines[0] in result.stderr.splitlines()
    assert "error:" not in result.stdout
    return lines[0]


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word ``w0`` … ``w94``; 0 is [UNK]. With ``bos``, it puts [BOS]
    (id 96, outside the tiny models' vocabulary) before every text, as Gemma's tokenizer does."""
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(WORDS)} | ({"[BOS]": VOCAB} if bos else {})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", VOCAB)])
    special = {"bos_token": "[BOS]"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]", **special)


# Gemma-3: sliding and full attention alternate (layer_types), and the window is shorter than the test
# inputs so that it matters; the attention scale is the head size's, as llama.cpp's gemma3 graph takes it
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention")
GEMMA3_TINY = dict(sliding_window=4, query_pre_attn_scalar=8)


def tiny_config(family: str = "llama", **overrides):
    """A 4-layer model: 6 query heads in 2 GQA groups of 3 (OPT: 6 heads with their own keys and values),
    head dim 8, 40 MLP neurons."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    if family == "gemma3_text":
        values.update(GEMMA3_TINY)
    values.update(overrides)
    if family == "gemma3_text" and "layer_types" not in overrides:
        values["layer_types"] = [GEMMA3_LAYER_TYPES[i % 2] for i in range(values["num_hidden_layers"])]
    config_class = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma3_text": Gemma3TextConfig,
        "phi3": Phi3Config,  # fused qkv_proj and gate_up_proj
        "opt": OPTConfig,  # biases everywhere, learned positions, fc1/fc2 with ReLU
    }[family]
    if family == "qwen2":
        values.pop("head_dim")  # Qwen2 derives it: 48 / 6 = 8
    if family == "opt":  # plain multi-head attention, head dim 48 / 6 = 8; the MLP width is ffn_dim
        values["ffn_dim"] = values.pop("intermediate_size")
        del values["num_key_value_heads"], values["head_dim"]
    return config_class(**values)


def tiny_loaded(family: str = "llama", seed: int = 0, **overrides) -> LoadedModel:
    """A tiny random model of ``family`` wrapped as slimlm loads models."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases, so bias slicing is exercised (init sets them to zero)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return LoadedModel(model, tiny_tokenizer(), adapter_for(config), f"tiny-{family}", Path("."), 0.0)


def for_family(subnet, family: str):
    """``subnet``, written for the tiny models' 2 GQA groups of 3 heads, for ``family``: in OPT every query
    head is its own key/value head, so it keeps the key/value heads of its kept query heads."""
    from slimlm.subnet import LayerKeep, SubNetwork

    if family != "opt":
        return subnet
    return SubNetwork({i: LayerKeep(k.heads, k.heads, k.neurons) for i, k in subnet.layers.items()})


def unfused_llama(phi3: LoadedModel) -> LoadedModel:
    """The same model with separate q/k/v and gate/up projections: a Llama holding Phi-3's weights."""
    config = phi3.model.config
    llama = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")})
    ).eval()
    state = {k: v for k, v in phi3.model.state_dict().items() if "qkv_proj" not in k and "gate_up_proj" not in k}
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        qkv = phi3.model.state_dict()[prefix + "self_attn.qkv_proj.weight"]
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        gate, up = phi3.model.state_dict()[prefix + "mlp.gate_up_proj.weight"].chunk(2)
        for name, weight in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v)):
            state[f"{prefix}{name}.weight"] = weight
        state[prefix + "mlp.gate_proj.weight"], state[prefix + "mlp.up_proj.weight"] = gate, up
    result = llama.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
    return LoadedModel(llama, tiny_tokenizer(), adapter_for(llama.config), "tiny-unfused", Path("."), 0.0)


def fast_search_settings(text: Path) -> dict:
    """Search settings that make a tiny model's search take seconds: 16-token windows, 8 for
    calibration, 2 scored per candidate, 2 for evaluation, 12 for refinement (the 8 and 4 more)."""
    return dict(
        calibration=str(text),
        evaluation=str(text),
        seq_len=16,
        calibration_windows=8,
        fitness_windows=2,
        evaluation_windows=2,
        refine_windows=12,
    )


def save_tiny(loaded: LoadedModel, folder: Path) -> Path:
    """Save a tiny model with its tokenizer as a Hugging Face folder."""
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models gain nothing from threads, and threads on busy cores make them crawl; the real model keeps them."""
    if "real" in request.keywords:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A long local text the tiny tokenizer encodes one token per word."""
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Fast tests get an empty cache; real tests keep the default one so reruns are quick."""
    if "real" not in request.keywords:
        monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))


def save_subnet(subnet, path: Path, model_folder: Path) -> Path:
    """Write ``subnet`` as slimlm does: recording the model (at ``model_folder``) it was made for."""
    from slimlm.models import load_model
    from slimlm.subnet import model_record

    loaded = load_model(model_folder)
    subnet.save(path, model_record(loaded.dims, loaded.fingerprint()))
    return path


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL cluster (``tests.postgres.throwaway_cluster``: a temporary folder, a Unix
    socket only, stopped and deleted afterwards); its SQLAlchemy URL. Skipped, with the reason, only
    where the server is not installed (``.ci/run`` installs it, so CI never skips)."""
    if server_bin() is None:
        pytest.skip(MISSING)
    with throwaway_cluster() as url:
        yield url
