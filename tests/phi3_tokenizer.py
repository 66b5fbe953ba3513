"""The real Phi-3 tokenizer, rebuilt offline from committed fixtures (see tests/fixtures/phi3/ORIGIN.md).

`write_phi3_tokenizer` lays out a directory like microsoft/Phi-3-mini-4k-instruct's tokenizer files: its
`tokenizer_config.json` and `special_tokens_map.json`, and a `tokenizer.json` with the Hub's pipeline
(SentencePiece-style BPE with byte fallback, a `Prepend("▁")` + `Replace(" ", "▁")` normalizer and no
pre-tokenizer) around the vocabulary of llama.cpp's `ggml-vocab-phi-3.gguf`, whose own test strings and ids
come with it (`llama_cpp_reference`). `write_phi3_model_configs` adds the Hub's `config.json` and
`generation_config.json`, for a model of the real architecture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gguf import GGUFReader
from transformers.tokenization_utils_base import generate_merges

FIXTURES = Path(__file__).parent / "fixtures" / "phi3"
VOCAB_GGUF = FIXTURES / "ggml-vocab-phi-3.gguf"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"  # between the strings of llama.cpp's .inp file

# tokenizer.model's pieces; the GGUF lists after them the added tokens and llama.cpp's [PADn] fillers up
# to the model's 32064 embedding rows.
SENTENCEPIECE_SIZE = 32000

END_OF_TEXT_ID = 32000
ASSISTANT_ID = 32001
SYSTEM_ID = 32006
END_OF_TURN_ID = 32007
USER_ID = 32010

WORD_START = "\u2581"  # SentencePiece's "▁", which stands for a space


def write_phi3_tokenizer(directory: Path) -> Path:
    """Write Phi-3-mini-4k-instruct's tokenizer files into `directory` (created if need be); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(FIXTURES / name, directory / name)
    added = _added_tokens()
    (directory / "tokenizer.json").write_text(
        json.dumps(_tokenizer_json(added), ensure_ascii=False), encoding="utf-8"
    )
    added_tokens = {token["content"]: token["id"] for token in added if token["id"] >= SENTENCEPIECE_SIZE}
    (directory / "added_tokens.json").write_text(json.dumps(added_tokens, indent=2, sort_keys=True) + "\n")
    return directory


def write_phi3_model_configs(directory: Path) -> Path:
    """Write the Hub's `config.json` and `generation_config.json` into `directory`; returns it.

    `save_pretrained` of a model made from a config writes a generation config of its own (eos 32000 only):
    give the model `GenerationConfig.from_pretrained(directory)` before saving it there.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(FIXTURES / name, directory / name)
    return directory


def llama_cpp_reference() -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings with the ids Phi-3's Hugging Face tokenizer gave them (no BOS)."""
    texts = (FIXTURES / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8").split(TEST_SEPARATOR)
    lines = (FIXTURES / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").splitlines()
    assert texts.pop() == "", "the .inp file ends with a separator"
    return [(text, [int(token) for token in line.split()]) for text, line in zip(texts, lines, strict=True)]


def _added_tokens() -> list[dict]:
    """tokenizer.json's added tokens: those of the Hub's tokenizer_config.json, with the same flags."""
    config = json.loads((FIXTURES / "tokenizer_config.json").read_text(encoding="utf-8"))
    return [{"id": int(token_id), **token} for token_id, token in config["added_tokens_decoder"].items()]


def _tokenizer_json(added_tokens: list[dict]) -> dict:
    reader = GGUFReader(VOCAB_GGUF)
    pieces = reader.fields["tokenizer.ggml.tokens"].contents()[:SENTENCEPIECE_SIZE]
    scores = reader.fields["tokenizer.ggml.scores"].contents()[:SENTENCEPIECE_SIZE]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    # SentencePiece BPE applies the best-scored merge first; a BPE merge list in score order does the same.
    merges = generate_merges(vocab, dict(zip(pieces, scores, strict=True)))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": WORD_START},
                {"type": "Replace", "pattern": {"String": " "}, "content": WORD_START},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": None,  # no BOS, as tokenizer_config.json's add_bos_token says
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": WORD_START}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
