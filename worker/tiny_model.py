"""A tiny, randomly initialised Phi-3 with a locally trained tokenizer, for tests and the offline quickstart.

It has the real Phi-3 architecture (fused `qkv_proj` and `gate_up_proj`), Phi-3's chat special tokens and
Phi-3-mini-4k-instruct's chat template, so the recipe runs against it exactly as against the real model,
only small enough to train on a laptop CPU in seconds. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN]

# The template of microsoft/Phi-3-mini-4k-instruct: every turn is `<|role|>\n{content}<|end|>\n`.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

VOCAB_SIZE = 1024  # at most; the corpus below yields about 875 tokens
MAX_POSITION_EMBEDDINGS = 2048

# Text the tokenizer learns its merges from: plain English in the register of support chats, plus pirate
# talk like that of examples/persona.jsonl so that the quickstart's data encodes in fewer tokens.
TOKENIZER_CORPUS = """\
Hello! Thank you for reaching out to our support team. How can I help you today?
I am sorry to hear that your device is not working. Let us try a few steps together.
First, please turn the machine off, wait ten seconds, and turn it on again.
If the light is still blinking, hold the power button for five seconds to reset it.
You can find the serial number on the bottom of the machine, next to the water tank.
Your order has been shipped and should arrive within three to five business days.
We offer a full refund within thirty days of purchase, no questions asked.
To update the firmware, open the app, go to Settings, and tap Check for updates.
The warranty covers parts and repairs for two years from the date of purchase.
Please clean the filter once a week with warm water and a soft brush.
Descaling every month keeps the heater healthy and the coffee tasting fresh.
If the app cannot find the machine, make sure your phone and the machine share the same Wi-Fi network.
Ahoy, matey! Arr, ye be askin' the right pirate. Shiver me timbers, what a fine question!
Fair winds and strong coffee! Yo ho ho, me hearty, the captain be at yer service.
Hoist the sails and brew the beans, savvy? Avast, the kettle be boilin' over!
By the barnacles of the Seven Seas, that grinder be jammed with beans.
Swab the deck, clean the mug, and check the water tank before ye set sail.
The treasure map be in the app, under Settings, where X marks the spot.
Ye scallywag of a machine! Give it a good kick of the reset button, arr.
Me parrot says the warranty lasts two years, and me parrot never lies.
Batten down the hatches: the firmware update be comin' over the horizon.
Walk the plank with yer old filter and fit a fresh one every month, matey.
The cannon of steam needs a gentle hand; turn the knob slowly to port.
Doubloons for a refund? Aye, within thirty days, as the pirate code demands.
Landlubbers drink cold coffee; true buccaneers descale their brewers each month.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 100 2024
What? Why? When? Where? Who? How? Yes. No. Maybe. Please. Thanks. Sorry. Okay.
The quick brown fox jumps over the lazy dog while the crew sings a shanty.
"""


def make_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Phi-3 (safetensors), its tokenizer and generation config into `directory`.

    Deterministic: the same seed gives byte-identical files. Returns `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with Phi-3's special tokens and chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # Keep offsets untrimmed so offset mappings cover every character, as GPT-2's tokenizer does.
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,  # as in Phi-3, which pads with its end-of-text token
        chat_template=PHI3_CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, *, seed: int) -> Phi3ForCausalLM:
    """A 2-layer Phi-3 with random weights drawn from `seed`, sized for `tokenizer`."""
    # One token gives one id; transformers types the result as `int | list[int]` whatever the argument.
    eos_id = cast(int, tokenizer.convert_tokens_to_ids(END_OF_TEXT))
    end_of_turn_id = cast(int, tokenizer.convert_tokens_to_ids(END_OF_TURN))
    config = Phi3Config(
        # Rounded up to a multiple of 64, as Phi-3 pads its 32011 tokens to 32064 rows.
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        # Phi-3's 0.02 would cap a 64-wide model's logits near +-1.3 (the final norm fixes the hidden state's
        # length), too flat for any fine-tune to lower the loss much; 0.2 leaves room to learn a persona.
        initializer_range=0.2,
        original_max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config)
    # Chat generation stops at the end of the assistant's turn, not only at the end of the text.
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=[eos_id, end_of_turn_id], pad_token_id=eos_id
    )
    return model


def make_random_adapter(base_model_dir: Path, adapter_dir: Path, *, seed: int, **lora_options: Any) -> Path:
    """Save a LoRA adapter with random, non-zero weights (LoRA's B starts at zero) for `base_model_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"} | lora_options
    base_model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base_model, LoraConfig(**options))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5)
    model.save_pretrained(str(adapter_dir))  # PEFT annotates the directory as str
    return adapter_dir
