"""The real Phi-3 tokenizer as the worker and the server load it (issue 8): ids, label masks, stopping.

The references are the tokenizer's own `tokenizer.json` run by `tokenizers`, and the ids llama.cpp keeps for
Phi-3's vocabulary (see tests/fixtures/phi3/ORIGIN.md).
"""

from __future__ import annotations

import json
import queue
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.phi3_tokenizer import (
    ASSISTANT_ID,
    END_OF_TEXT_ID,
    END_OF_TURN_ID,
    SYSTEM_ID,
    USER_ID,
    llama_cpp_reference,
    write_phi3_model_configs,
)
from worker.data import tokenize_conversation
from worker.model_loader import load_base_model
from worker.serving.engine import Engine, Finished, GenerationRequest, TextDelta
from worker.tokenizer import load_tokenizer, restore_pipeline

CONVERSATION = [
    {"role": "system", "content": "You are a helpful pirate."},
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "Ahoy! I be Captain Byte, at yer service."},
    {"role": "user", "content": "Tell me a joke.\nA short one, please."},
    {"role": "assistant", "content": "Why did the crab never share?\nBecause he was shellfish! 🦀"},
]
REPLIES = [message["content"] for message in CONVERSATION if message["role"] == "assistant"]
ROLE_IDS = {SYSTEM_ID, USER_ID, ASSISTANT_ID}


@pytest.fixture(scope="module")
def reference(phi3_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(phi3_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def phi3(phi3_tokenizer_dir: Path):
    return load_tokenizer(str(phi3_tokenizer_dir))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_ids(reference: Tokenizer, text: str) -> list[int]:
    """The ids of `text` with the special tokens in it split off, as tokenizer.json gives them."""
    return reference.encode(text, add_special_tokens=False).ids


def test_tokenizer_json_encodes_as_llama_cpp_does(reference: Tokenizer) -> None:
    cases = llama_cpp_reference()
    assert len(cases) == 46
    assert [(text, ids) for text, ids in cases if reference_ids(reference, text) != ids] == []


def test_load_tokenizer_encodes_as_llama_cpp_does(phi3) -> None:
    assert [(text, ids) for text, ids in llama_cpp_reference() if encode(phi3, text) != ids] == []


def test_load_tokenizer_keeps_the_hub_configuration(phi3, phi3_tokenizer_dir: Path) -> None:
    config = json.loads((phi3_tokenizer_dir / "tokenizer_config.json").read_text())
    assert type(phi3).__name__ == config["tokenizer_class"]
    assert phi3.chat_template == config["chat_template"]
    assert (phi3.bos_token, phi3.eos_token, phi3.pad_token, phi3.unk_token) == (
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<unk>",
    )
    assert phi3.model_max_length == 4096
    assert len(phi3) == 32011
    assert phi3.convert_tokens_to_ids("<|end|>") == END_OF_TURN_ID
    assert phi3.added_tokens_decoder[END_OF_TURN_ID].special


def test_chat_template_ids_are_the_reference_ids_of_the_rendered_text(phi3, reference: Tokenizer) -> None:
    expected = reference_ids(reference, phi3.apply_chat_template(CONVERSATION, tokenize=False))
    assert phi3.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"] == expected
    assert tokenize_conversation(CONVERSATION, phi3)[0] == expected
    # Each turn's text starts with the normalizer's "▁": the piece Phi-3 saw after its role tokens.
    after_roles = [expected[index + 1] for index, token in enumerate(expected) if token in ROLE_IDS]
    assert phi3.convert_ids_to_tokens(after_roles) == ["▁You", "▁Hello", "▁A", "▁Tell", "▁Why"]


def test_prompt_of_the_server_is_the_reference_prompt(phi3, reference: Tokenizer) -> None:
    prompt = phi3.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|assistant|>\n")
    ids = phi3.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True, return_dict=False)
    assert ids == reference_ids(reference, prompt)
    assert ids[-1] == ASSISTANT_ID  # its rstrip takes the "\n" along


def reply_mask(tokenizer, ids: list[int]) -> list[int]:
    """What the loss must cover: each assistant turn from its first piece with text to the <|end|> closing
    it. Pieces before that ("▁", "<0x0A>") are the newline the template writes after <|assistant|>."""
    mask, state = [], "outside"
    for token, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if state == "turn start" and piece not in ("▁", "<0x0A>"):
            state = "reply"
        mask.append(int(state == "reply"))
        if token == ASSISTANT_ID:
            state = "turn start"
        elif token == END_OF_TURN_ID:
            state = "outside"
    return mask


@pytest.fixture(scope="module", params=["hub", "role tokens without rstrip"])
def mask_tokenizer(request: pytest.FixtureRequest, phi3_tokenizer_dir: Path, tmp_path_factory):
    """The Hub's tokenizer, whose role tokens take the newline after them along (rstrip), and one whose role
    tokens do not: there pieces "▁" and "<0x0A>" start each turn, and a reply's leading space goes into its
    first word piece, across the turn's edge."""
    if request.param == "hub":
        return load_tokenizer(str(phi3_tokenizer_dir))
    directory = Path(shutil.copytree(phi3_tokenizer_dir, tmp_path_factory.mktemp("phi3") / "tokenizer"))
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        content = json.loads((directory / name).read_text(encoding="utf-8"))
        for token in content[key] if name == "tokenizer.json" else content[key].values():
            token["rstrip"] = False
        (directory / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return load_tokenizer(str(directory))


@pytest.mark.parametrize("lead", ["", " "], ids=["reply", "reply with a leading space"])
def test_label_mask_covers_each_reply_and_its_end_token(mask_tokenizer, lead: str) -> None:
    messages = [{**message, "content": lead + message["content"]} for message in CONVERSATION]
    ids, mask = tokenize_conversation(messages, mask_tokenizer)
    assert mask == reply_mask(mask_tokenizer, ids)
    assert sum(mask) > len(REPLIES)


def trained_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs, run = [], []
    for token, trained in [*zip(ids, mask, strict=True), (None, 0)]:
        if trained:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return runs


def test_decoding_a_trained_turn_gives_the_reply_and_its_end(phi3) -> None:
    runs = trained_runs(*tokenize_conversation(CONVERSATION, phi3))
    assert [run[-1] for run in runs] == [END_OF_TURN_ID] * len(REPLIES)
    assert [phi3.decode(run[:-1]) for run in runs] == REPLIES
    assert [phi3.decode(run) for run in runs] == [reply + "<|end|>" for reply in REPLIES]


def test_transformers_rebuilt_pipeline_is_measured_and_restored(
    phi3_tokenizer_dir: Path, reference: Tokenizer
) -> None:
    """Measurement: what plain `AutoTokenizer` encodes differently. Passes whatever transformers does."""
    plain = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
    texts = ["<|user|>\nHello", " Hello world", plain.apply_chat_template(CONVERSATION, tokenize=False)]
    before = [encode(plain, text) for text in texts]
    replaced = restore_pipeline(plain, reference)
    after = [encode(plain, text) for text in texts]
    for text, plain_ids, ids in zip(texts, before, after, strict=True):
        print(f"{text!r}: AutoTokenizer {plain_ids} -> restored {ids}")
    print(f"replaced: {replaced}")
    assert after == [reference_ids(reference, text) for text in texts]
    assert replaced or before == after
    assert restore_pipeline(plain, reference) == []


def test_load_tokenizer_leaves_the_tiny_models_tokenizer_as_it_is(tiny_model_dir: Path) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    saved = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert restore_pipeline(plain, saved) == []
    assert load_tokenizer(str(tiny_model_dir)).backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()


@pytest.fixture(scope="module")
def end_of_turn_model_dir(phi3_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phi-3 with the Hub's configs and tokenizer, 2 layers of width 64, rigged to always predict <|end|>."""
    directory = Path(shutil.copytree(phi3_tokenizer_dir, tmp_path_factory.mktemp("models") / "phi3-end"))
    write_phi3_model_configs(directory)
    config = AutoConfig.from_pretrained(
        directory,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # A large constant feature in every embedding survives the layers, so the last hidden state always
        # points along it; only <|end|>'s output row reads that feature.
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[END_OF_TURN_ID, 0] = 1.0
    model.generation_config = GenerationConfig.from_pretrained(directory)  # save_pretrained writes it
    model.save_pretrained(directory)
    return directory


def test_generation_stops_at_the_end_of_turn_token(end_of_turn_model_dir: Path) -> None:
    model, tokenizer = load_base_model(str(end_of_turn_model_dir), for_training=False)
    assert model.generation_config.eos_token_id == [END_OF_TEXT_ID, ASSISTANT_ID, END_OF_TURN_ID]
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=False)
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        events: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=8), events.put)
        received = [events.get(timeout=60)]
        while isinstance(received[-1], TextDelta):
            received.append(events.get(timeout=60))
    finally:
        engine.stop()
    assert received == [Finished("stop", prompt_tokens=len(prompt), completion_tokens=1)]
