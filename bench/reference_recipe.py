"""The reference recipe of `python -m bench train`: Phi-3-mini-4k-instruct's `sample_finetune.py` (the
fine-tuning example of the model card, TRL `SFTTrainer` + peft `LoraConfig`), ported to TRL 1.x and
transformers 5.

The script's two dictionaries are kept below as it writes them (TRAINING_CONFIG, PEFT_CONFIG): LoRA r=16,
alpha 32, dropout 0.05 on all linear layers; a cosine schedule with 20% warm-up, seed 0, bf16, gradient
checkpointing (use_reentrant False), batch 4, and the tokenizer padding with `<unk>` on the right. Each batch
is padded to its longest sequence (TRL's collator) and no examples are packed.

What the port changes, and why:

- TRL 1.x and transformers 5 API: `max_seq_length=`, `dataset_text_field=`, `packing=` and `tokenizer=` of
  `SFTTrainer(...)` became `SFTConfig(max_length=, packing=)` and `processing_class=`;
  `gradient_checkpointing` is `activation_checkpointing`; `warmup_ratio` is gone (a `warmup_steps` below 1
  is that fraction of the steps); `torch_dtype=` is `dtype=`; Phi-3 is built into transformers, so no
  `trust_remote_code`.
- Precision and memory follow the hardware, as the benchmark compares like with like: on a GPU bf16
  weights, bf16 autocast and activation checkpointing as in the card, with FlashAttention-2 when flash-attn
  imports (else PyTorch's SDPA); on the CPU fp32 weights, no autocast (the card's bf16 needs a GPU), SDPA
  and no checkpointing (a CPU run is compute-bound: recomputing the forward pass would cost a third more
  time, to save memory the CPU does not lack).
- Packing off: the card's script passes `packing=True`; the reference this benchmark is specified against is
  per-batch padding without packing (TRL's default).
- Data and loss: the card applies the chat template to ultrachat_200k into a `text` column and trains on every
  token. Here the data is the benchmark's (the same conversations as phitune's side, given as TRL's
  conversational prompt-completion records, the turns before the final reply as the prompt), and the loss
  covers the completion only (TRL's default for prompt-completion data), as phitune's default covers the
  assistant's replies only: both train the same objective, and the benchmark scores the same tokens. The card
  ends every `text` with the template's end-of-text token; TRL's prompt-completion tokenization keeps it too.
- The tokenizer is loaded with `worker.tokenizer.load_tokenizer`: transformers 5's `AutoTokenizer` rebuilds
  Phi-3's normalizer and encodes text after the role tokens with other ids than the model's `tokenizer.json`
  (see that module); both sides and the benchmark's scorer use the same ids. `model_max_length`, the `<unk>`
  padding on the right and `use_cache=False` are the card's.
- The learning rate, epochs, batch size and maximum length are `build_trainer`'s arguments, shared with
  phitune's side. The benchmark keeps the card's one epoch of batches of 4, but not its learning rate: 5e-6
  leaves a random-weight model's loss where it started, so eval loss could not tell the two sides apart.
  The card's `do_eval=False`, `save_steps=100` and `log_level="info"` become no evaluation, no checkpoints
  and transformers' default log level (the benchmark scores the trained model afterwards, and measures
  training, not checkpointing); the adapter is saved once at the end, as the card's `save_model` does.
- `include_num_input_tokens_seen="non_padding"` and `disable_tqdm=True`: measurement and quiet output only.
- `quantization="4bit"` (the GPU check's QLoRA, not in the card): the base loaded as the QLoRA paper and
  PEFT's guide load it (NF4, double quantisation, bf16 compute) and readied by
  `prepare_model_for_kbit_training`, with the card's checkpointing where the card has it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.utils import is_flash_attn_2_available
from trl import SFTConfig, SFTTrainer

from worker.tokenizer import load_tokenizer

# sample_finetune.py's dictionaries, verbatim.
TRAINING_CONFIG: dict[str, Any] = {
    "bf16": True,
    "do_eval": False,
    "learning_rate": 5.0e-06,
    "log_level": "info",
    "logging_steps": 20,
    "logging_strategy": "steps",
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1,
    "max_steps": -1,
    "output_dir": "./checkpoint_dir",
    "overwrite_output_dir": True,
    "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4,
    "remove_unused_columns": True,
    "save_steps": 100,
    "save_total_limit": 1,
    "seed": 0,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.2,
}
PEFT_CONFIG: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "modules_to_save": None,
}
MODEL_MAX_LENGTH = 2048  # the card's tokenizer.model_max_length


def prompt_completion(messages: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """A conversation ending with the assistant's reply as TRL's conversational prompt-completion record."""
    if messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with the assistant's reply")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def build_trainer(
    model_dir: Path,
    conversations: list[list[dict[str, str]]],
    output_dir: Path,
    *,
    learning_rate: float,
    num_train_epochs: int,
    batch_size: int,
    max_length: int,
    quantization: str | None = None,
) -> SFTTrainer:
    """The card's model, tokenizer, LoRA and trainer on `conversations` (each ending with the reply to learn),
    ready to `train()`; QLoRA over a 4-bit base with `quantization="4bit"`."""
    on_gpu = torch.cuda.is_available()
    card = TRAINING_CONFIG
    quantized: dict[str, Any] = {}
    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        quantized = {"quantization_config": config, "device_map": "cuda" if on_gpu else "cpu"}
    elif quantization is not None:
        raise ValueError(f"the reference recipe quantises to 4bit only, not {quantization}")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        use_cache=False,
        dtype=torch.bfloat16 if on_gpu else torch.float32,
        attn_implementation="flash_attention_2" if on_gpu and is_flash_attn_2_available() else "sdpa",
        **quantized,
    )
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=on_gpu and card["gradient_checkpointing"],
            gradient_checkpointing_kwargs=card["gradient_checkpointing_kwargs"],
        )
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    tokenizer.pad_token = tokenizer.unk_token  # the card: unk rather than eos, to prevent endless generation
    tokenizer.pad_token_id = tokenizer.convert_tokens_to_ids(tokenizer.pad_token)
    tokenizer.padding_side = "right"
    args = SFTConfig(
        output_dir=str(output_dir),
        bf16=on_gpu,
        use_cpu=not on_gpu,
        learning_rate=learning_rate,
        logging_steps=card["logging_steps"],
        logging_strategy=card["logging_strategy"],
        lr_scheduler_type=card["lr_scheduler_type"],
        num_train_epochs=num_train_epochs,
        max_steps=card["max_steps"],
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        remove_unused_columns=card["remove_unused_columns"],
        save_strategy="no",
        seed=card["seed"],
        activation_checkpointing=on_gpu and card["gradient_checkpointing"],
        activation_checkpointing_kwargs=card["gradient_checkpointing_kwargs"],
        gradient_accumulation_steps=card["gradient_accumulation_steps"],
        warmup_steps=card["warmup_ratio"],
        max_length=max_length,
        packing=False,
        eval_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    dataset = Dataset.from_list([prompt_completion(messages) for messages in conversations])
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**PEFT_CONFIG),
    )
