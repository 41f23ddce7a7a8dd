"""A model's tokenizer as GGUF keys: kept from the GGUF file a model came from, or built from its
Hugging Face tokenizer.

A model loaded from a GGUF file keeps that file's ``tokenizer.*`` keys beside its weights
(``TOKENIZER_GGUF``, a few MB, no tensors), so that its export carries llama.cpp's own tokenizer
unchanged; loading and extraction write it, export reads it. A model from a Hugging Face folder has its
vocabulary read by gguf's readers, and needs llama.cpp's name for its pre-tokenizer from the user.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from slimlm.errors import SlimlmError

TOKENIZER_GGUF = "slimlm_tokenizer.gguf"


def tokenizer_gguf(folder: str | Path) -> Path | None:
    """The GGUF holding this model folder's tokenizer keys, if it came from a GGUF file."""
    path = Path(folder) / TOKENIZER_GGUF
    return path if path.is_file() else None


def copy_tokenizer_keys(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Copy every ``tokenizer.*`` key of ``reader`` to ``writer``, with its GGUF types."""
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def save_tokenizer_gguf(source: str | Path, folder: str | Path) -> Path:
    """Keep the tokenizer keys of the GGUF file ``source`` in ``folder`` (no tensors: a few MB)."""
    path = Path(folder) / TOKENIZER_GGUF
    writer = gguf.GGUFWriter(path, arch="tokenizer")
    copy_tokenizer_keys(gguf.GGUFReader(source), writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def check_tokenizer(folder: str | Path, tokenizer_pre: str | None) -> None:
    """Refuse, before any slow work, a tokenizer ``write_tokenizer`` could not write."""
    if tokenizer_gguf(folder) is not None:
        return
    if tokenizer_pre is None:
        raise SlimlmError(
            f"{folder} did not come from a GGUF file, so llama.cpp's name for its pre-tokenizer is unknown; "
            "pass --tokenizer-pre NAME (the name llama.cpp's converter gives this tokenizer, e.g. llama-bpe, "
            "qwen2, smollm)"
        )
    kind = _tokenizer_model(folder)["type"]
    if kind != "BPE":
        raise SlimlmError(f"llama.cpp's GGUF tokenizers are BPE (byte-level or with byte fallback); this one is {kind}")


def write_tokenizer(writer: gguf.GGUFWriter, folder: str | Path, tokenizer_pre: str | None) -> None:
    """The tokenizer of the model in ``folder``, as GGUF keys: the kept keys of its source GGUF unless a
    pre-tokenizer name asks for the Hugging Face tokenizer to be read instead."""
    source = tokenizer_gguf(folder)
    if source is not None and tokenizer_pre is None:
        copy_tokenizer_keys(gguf.GGUFReader(source), writer)
        return
    folder = Path(folder)
    # BPE with byte fallback is SentencePiece's (Llama 2, Mistral): llama.cpp's "llama" tokenizer, else "gpt2"
    byte_fallback = _tokenizer_model(folder).get("byte_fallback", False)
    vocab = gguf.LlamaHfVocab(folder) if byte_fallback else gguf.BpeVocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2").add_to_gguf(writer)


def _tokenizer_model(folder: str | Path) -> dict:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise SlimlmError(f"{folder} has no tokenizer.json to write into the GGUF file")
    return json.loads(path.read_text(encoding="utf-8"))["model"]
