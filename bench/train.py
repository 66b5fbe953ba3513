"""Training benchmark: phitune's worker against the reference recipe, same model, data and LoRA, same run.

`python -m bench train` trains a LoRA on a random-weight Phi-3-architecture model twice: through the
worker's own path (`worker.recipe.train`, the function a job runs, with a TrainingConfig whose
speed-relevant fields are left at their defaults: what a user gets) and through the reference recipe
(`bench.reference_recipe`: the Phi-3-mini model card's `sample_finetune.py` ported to TRL 1.x, per-batch
padding, no packing). Both get the same base model, the same conversations, the same LoRA config (r=16,
alpha 32, dropout 0.05, all-linear), batch size, maximum length, epochs, learning rate, warm-up, schedule
and seed, and precision chosen by the hardware (fp32 without checkpointing on the CPU; on a GPU bf16, the
reference with checkpointing as the card does, phitune's side as its default decides).

The model has Phi-3-mini's configuration and real vocabulary (32064 rows, the real tokenizer rebuilt
offline, see tests/real_phi3.py) at MODEL_AND_DATA's width and depth. The data is a deterministic synthetic
chat set (`synthetic_conversations`): Zipf-distributed words in sentences, reply lengths log-normal (most
replies short, a long tail that reaches the maximum length and is truncated there). A held-out set of the
same kind scores both trained models with one function (`assistant_loss`: mean negative log-likelihood over
the tokens of the assistant's reply and the end-of-turn token after it, the tokens phitune trains on).

Each side trains in a process of its own (`python -m bench.train --side NAME DIR`), so that its peak RSS is
its own, for `rounds` rounds, alternating which side goes first. Per side it reports:

    tokens_per_s   real (non-padding) tokens trained per second of training: the tokens of the side's
                   prepared training set × epochs, ÷ the trainer's train_runtime (its training loop)
    wall_s         the whole side: loading the model and data, training, saving the adapter
    peak_rss_mb    the side's process, at the end of training
    eval_loss      `assistant_loss` of the trained model on the held-out set
    mfu            model FLOPs per second (`training_flops`) ÷ PEAK matmul FLOPs per second, measured in
                   the same run by timing large matmuls in the training dtype (`peak_matmul_flops`)

and `speedup` = ours tokens_per_s ÷ the reference's (the median over rounds of each round's ratio), with
each round's 1-minute load average of the machine (other processes slow both sides, not alike). Targets
(from the issue): speedup >= 2 on the CPU, eval_loss <= the reference's + 2%, mfu >= 0.30.

PHITUNE_BENCH_QUICK=1 runs the same steps on a tiny model and data set (the smoke test in
tests/test_bench.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUICK_ENV = "PHITUNE_BENCH_QUICK"


@dataclass(frozen=True)
class Setup:
    """What both sides share: the model's shape, the data's size and the training settings."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    train_examples: int
    eval_examples: int
    max_length: int
    batch_size: int
    epochs: int
    learning_rate: float
    rounds: int
    max_reply_words: int
    # The GPU check's settings (bench.gpu_check); the defaults are this benchmark's.
    reply_scale: float = 1.0  # reply lengths × this: longer conversations for a longer max_length
    quantization: str | None = None  # "4bit": QLoRA on both sides


# ~45M parameters: 4 layers of Phi-3-mini's shape at 512 wide (64-wide heads, the 8/3 MLP ratio), 12.5M
# weights in the layers, and the real 32064-token embedding and LM head (16M each). One side trains ~130
# conversations (~12k tokens) in one to two minutes on this 2-core machine, as other processes load it.
MODEL_AND_DATA = Setup(
    layers=4,
    hidden=512,
    intermediate=1344,
    heads=8,
    train_examples=128,
    eval_examples=48,
    max_length=512,
    batch_size=4,  # the card's and phitune's default
    epochs=1,  # the card's
    # Higher than the card's 5e-6 and phitune's default 2e-4, which in 32 steps move a random model's loss
    # too little for eval_loss to tell a side that learns worse.
    learning_rate=1e-3,
    rounds=2,
    max_reply_words=450,
)
QUICK = Setup(
    layers=1,
    hidden=64,
    intermediate=128,
    heads=2,
    train_examples=12,
    eval_examples=4,
    max_length=96,
    batch_size=4,
    epochs=1,
    learning_rate=2e-4,
    rounds=1,
    max_reply_words=80,
)
SIDES = ("ours", "reference")
WARMUP_RATIO = 0.2  # the card's; phitune's side is given the same


def setup() -> Setup:
    return QUICK if os.environ.get(QUICK_ENV) == "1" else MODEL_AND_DATA


# ---------------------------------------------------------------------------------------------------------
# The data


_WORD_TEXT = """
the a to of and in is it you that for on with as be this are can your we at by or from have not will if
one all but so they do more when which about there time out up use any make new what also just how only
other its these some our into than then them would could should each most first may like now over such
very well way even because help need want work file data model train token step loss rate batch run
machine coffee water filter heater tank light button reset order refund warranty firmware update setting
app phone network power serial number day week month year part repair clean brush brew bean grinder milk
steam kettle cup mug shipping address account password email support team question answer problem issue
error message screen display sound noise temperature pressure valve pump pipe cable plug socket battery
charge manual guide page section list table value result check test start stop open close turn hold
press wait again still never always often sometimes usually really quite rather almost enough too much
many few little less least best better good bad great small large long short high low fast slow hot cold
warm fresh old easy hard simple clear sure right wrong next last same different full empty free ready
please thanks sorry okay yes no hello indeed certainly perhaps probably exactly already soon
"""
_TOPIC_TEXT = """
descaling shipping refunds firmware warranty cleaning grinding brewing pairing passwords batteries
filters temperature pressure noise leaks subscriptions invoices returns accessories
"""
WORDS = list(dict.fromkeys(_WORD_TEXT.split()))  # in order of frequency, each once
TOPICS = _TOPIC_TEXT.split()
_ZIPF = [1 / (rank + 1) for rank in range(len(WORDS))]
_CUMULATIVE = [sum(_ZIPF[: index + 1]) for index in range(len(_ZIPF))]


def _sentences(rng: random.Random, words: int, topic: str) -> str:
    """About `words` words in sentences of 4-14 Zipf-distributed words, the topic now and then."""
    out: list[str] = []
    while len(out) < words:
        length = min(rng.randint(4, 14), words - len(out)) or 1
        sentence = rng.choices(WORDS, cum_weights=_CUMULATIVE, k=length)
        if rng.random() < 0.3:
            sentence[rng.randrange(length)] = topic
        sentence[0] = sentence[0].capitalize()
        out.extend(sentence[:-1])
        out.append(sentence[-1] + rng.choice(".....?!"))
    return " ".join(out)


def synthetic_conversations(
    count: int, *, seed: int, max_reply_words: int, reply_scale: float = 1.0
) -> list[list[dict[str, str]]]:
    """`count` support conversations (an optional system turn, a question, the reply to learn), the same for
    the same seed. Reply lengths are log-normal (median ~27 words × `reply_scale`, a tail to
    `max_reply_words`); questions are short."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        question_words = max(3, min(80, int(rng.lognormvariate(2.6, 0.6))))
        reply_words = max(3, min(max_reply_words, int(rng.lognormvariate(3.3, 1.2) * reply_scale)))
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": f"You are the support assistant for {topic}."})
        question = f"About {topic}: {_sentences(rng, question_words, topic)}"
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": _sentences(rng, reply_words, topic)})
        conversations.append(messages)
    return conversations


def write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    return path


def read_jsonl(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# Scoring: one function for both sides


def assistant_tokens(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> tuple[list, list]:
    """Token ids of a conversation (the chat template, as both sides render it) truncated to `max_length`,
    and which of them are scored: the final reply's tokens and the token after it (Phi-3's `<|end|>`, which
    the model must learn to generate to stop)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not text.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently alone")
    reply = messages[-1]["content"].strip()
    start = text.index(reply, len(prompt))
    end = start + len(reply)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    scored = [first < end and last > start for first, last in offsets]
    after = next((index for index, (first, _) in enumerate(offsets) if first >= end), None)
    if after is not None:
        scored[after] = True
    return ids[:max_length], scored[:max_length]


def assistant_loss(model: Any, tokenizer: Any, conversations: list, *, max_length: int) -> float:
    """Mean negative log-likelihood per scored token (`assistant_tokens`) of `conversations` under `model`,
    in its own dtype and device, padded per batch of 8 sequences of similar length."""
    import torch

    examples = sorted(
        (assistant_tokens(tokenizer, messages, max_length) for messages in conversations),
        key=lambda example: len(example[0]),
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(examples), 8):
            batch = examples[first : first + 8]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (tokens, scored) in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                labels[row, : len(tokens)] = torch.where(torch.tensor(scored), torch.tensor(tokens), -100)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += int((targets != -100).sum())
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------------------------------------------------
# FLOPs


def matmul_parameters(setup: Setup, *, r: int = 16) -> tuple[int, int]:
    """The weights of the layers' linear projections (qkv, o, gate_up, down), frozen, and of their LoRA
    matrices (rank `r`, A and B), trained."""
    d = setup.hidden
    head_dim = d // setup.heads
    kv_width = setup.heads * head_dim  # Phi-3-mini: as many key/value heads as query heads
    shapes = [(d, d + 2 * kv_width), (d, d), (d, 2 * setup.intermediate), (setup.intermediate, d)]
    frozen = setup.layers * sum(fan_in * fan_out for fan_in, fan_out in shapes)
    lora = setup.layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)
    return frozen, lora


def training_flops(
    setup: Setup, *, vocab: int, tokens: int, loss_tokens: int, sum_squared_lengths: int, recompute: bool
) -> float:
    """Model FLOPs of training the benchmark's LoRA over `tokens` tokens (a multiply-add is 2 FLOPs).

    A frozen weight matrix of N entries costs 2N per token forward and 2N backward (the gradient of its input
    only: no weight gradient), so 4N per token; a trained LoRA matrix 6N. Full recomputation (activation
    checkpointing) runs the forward pass again: 6N and 8N. The layers' linear weights (`matmul_parameters`)
    count for every token; the LM head (vocab × hidden) only for the tokens whose next token the loss covers,
    the only positions TRL's fused LM head projects (on both sides). Attention has no weights: QKᵀ and
    attention × V cost 2·2·d·s per token and layer forward over a sequence of s tokens, twice that backward
    (once more under recomputation), counted over the whole s × s square as PaLM's MFU does, each sequence
    with its own length s: 12·L·d·Σs² in all (16·L·d·Σs² with recomputation). Norms, activations, rotary
    embeddings, the softmax and the optimizer are left out.
    """
    frozen, lora = matmul_parameters(setup)
    extra = 2 if recompute else 0
    return (
        (4 + extra) * frozen * tokens
        + (6 + extra) * lora * tokens
        + 4 * vocab * setup.hidden * loss_tokens
        + (12 + 2 * extra) * setup.layers * setup.hidden * sum_squared_lengths
    )


def model_flops(setup: Setup, vocab: int, result: dict[str, Any]) -> float:
    """`training_flops` of one side's run, from the figures `run_side` returns."""
    return training_flops(
        setup,
        vocab=vocab,
        tokens=result["tokens"],
        loss_tokens=result["loss_tokens"],
        sum_squared_lengths=result["sum_squared_lengths"],
        recompute=result["recompute"],
    )


def peak_matmul_flops(device: str) -> float:
    """The best FLOPs per second of large square matmuls in the training dtype on `device` (fp32 on the CPU,
    bf16 on a GPU), with torch's default threads, as the training uses."""
    import torch

    size, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    repeats = 1 if device == "cpu" else 20
    best = math.inf
    for _ in range(10):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------------------------------
# One side, in its own process


class CollectingReporter:
    """A ProgressReporter (worker.recipe) that keeps the job's events and never stops or hands back."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.metrics: list[dict] = []

    def message(self, text: str, *, level: str = "info", data: dict | None = None) -> None:
        self.messages.append(text)

    def on_metrics(self, metrics: dict) -> None:
        self.metrics.append(metrics)

    def on_checkpoint(self, step: int, adapter_dir: Path, metrics: dict) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def hand_back(self) -> str | None:
        return None

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        pass


def train_ours(scratch: Path, shared: Setup) -> Any:
    """A job's training, through the worker's own function; returns its trainer."""
    from app.specs import PeftConfig, TrainingConfig
    from bench.reference_recipe import PEFT_CONFIG
    from worker.recipe import RecipeInputs, train

    config = TrainingConfig(
        # The shared settings; every speed-relevant field (precision, checkpointing, ...) is the default.
        learning_rate=shared.learning_rate,
        num_train_epochs=shared.epochs,
        per_device_train_batch_size=shared.batch_size,
        per_device_eval_batch_size=shared.batch_size,
        max_seq_length=shared.max_length,
        warmup_ratio=WARMUP_RATIO,
        seed=0,
        logging_steps=20,
    )
    inputs = RecipeInputs(
        base_model=str(scratch / "model"),
        training_file=scratch / "train.jsonl",
        validation_file=None,
        training_config=config,
        peft_config=PeftConfig(**PEFT_CONFIG, quantization=shared.quantization),
        output_dir=scratch / "ours",
    )
    return train(inputs, CollectingReporter()).trainer


def train_reference(scratch: Path, shared: Setup) -> Any:
    """The reference recipe on the same data; returns its trainer, its adapter saved as the card does."""
    import torch

    from bench.reference_recipe import build_trainer

    trainer = build_trainer(
        scratch / "model",
        read_jsonl(scratch / "train.jsonl"),
        scratch / "reference",
        learning_rate=shared.learning_rate,
        num_train_epochs=shared.epochs,
        batch_size=shared.batch_size,
        max_length=shared.max_length,
        quantization=shared.quantization,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the training's peak, as phitune's side measures its own
    trainer.train()
    trainer.save_model(str(scratch / "reference" / "adapter"))
    return trainer


def dataset_work(dataset: Any) -> dict[str, int]:
    """Tokens, tokens whose next token is trained, and Σ s² over the sequences of a prepared training set
    (packed rows count each packed sequence: TRL's `seq_lengths` column)."""
    columns = dataset.column_names
    rows = dataset["input_ids"]
    tokens = sum(len(ids) for ids in rows)
    if "labels" in columns:
        loss_tokens = sum(sum(1 for label in labels[1:] if label != -100) for labels in dataset["labels"])
    elif "completion_mask" in columns:
        loss_tokens = sum(sum(mask[1:]) for mask in dataset["completion_mask"])
    else:
        loss_tokens = tokens
    if "seq_lengths" in columns:
        lengths = [length for row in dataset["seq_lengths"] for length in row]
    else:
        lengths = [len(ids) for ids in rows]
    return {"tokens": tokens, "loss_tokens": loss_tokens, "sum_squared_lengths": sum(s * s for s in lengths)}


def install_step_clock() -> list[tuple[float, int]]:
    """Make every trainer this process builds note, at the end of each optimizer step, the time and the input
    tokens trained so far (after waiting for the GPU): one clock for both sides, without touching either's
    code (a callback class in transformers' defaults). Returns the list it fills."""
    import torch
    from transformers import TrainerCallback
    from transformers import trainer as transformers_trainer

    ticks: list[tuple[float, int]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ticks.append((time.perf_counter(), state.num_input_tokens_seen))

    transformers_trainer.DEFAULT_CALLBACKS.append(StepClock)
    return ticks


def run_side(side: str, scratch: Path) -> dict[str, Any]:
    """Train one side on the prepared scratch directory and measure it (in this process)."""
    import torch

    from worker.tokenizer import load_tokenizer

    shared = Setup(**json.loads((scratch / "setup.json").read_text()))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    ticks = install_step_clock()  # after `start`: wall_s counts importing transformers, as the sides would
    trainer = (train_ours if side == "ours" else train_reference)(scratch, shared)
    wall_s = time.perf_counter() - start
    load = [load_before, os.getloadavg()[0]]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    summary = next(log for log in reversed(trainer.state.log_history) if "train_runtime" in log)
    epochs = trainer.args.num_train_epochs
    work = {name: int(value * epochs) for name, value in dataset_work(trainer.train_dataset).items()}
    tokenizer = load_tokenizer(str(scratch / "model"))
    held_out = read_jsonl(scratch / "eval.jsonl")
    eval_loss = (
        assistant_loss(trainer.model, tokenizer, held_out, max_length=shared.max_length) if held_out else None
    )
    args = trainer.args
    return {
        "train_s": summary["train_runtime"],
        "wall_s": wall_s,
        "peak_rss_mb": peak_rss_mb,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "eval_loss": eval_loss,
        "train_loss": summary["train_loss"],
        "steps": trainer.state.global_step,
        "recompute": bool(args.activation_checkpointing),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "device": str(args.device),
        "load_1m": load,
        # Seconds since the first step ended, and input tokens trained, at the end of each step.
        "step_ends": [[round(t - ticks[0][0], 4), tokens] for t, tokens in ticks] if ticks else [],
        **work,
    }


def run_child(side: str, scratch: Path, *, timeout: float | None = None) -> dict[str, Any]:
    """`run_side` in a fresh process (its output to our stderr: stdout is the benchmark's JSON line), killed
    after `timeout` seconds (subprocess.TimeoutExpired)."""
    out = scratch / f"{side}.json"
    command = [sys.executable, "-m", "bench.train", "--side", side, str(scratch), "--out", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=sys.stderr, timeout=timeout)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def prepare(scratch: Path, shared: Setup, *, model_dir: Path | None = None) -> dict[str, Any]:
    """Write the model (or link `model_dir`, a model of `shared`'s shape written already), the training and
    held-out sets and the shared setup into `scratch`."""
    from tests.real_phi3 import write_random_phi3
    from worker.tokenizer import load_tokenizer

    if model_dir is not None:
        (scratch / "model").symlink_to(model_dir.resolve(), target_is_directory=True)
    else:
        write_random_phi3(
            scratch / "model",
            layers=shared.layers,
            hidden_size=shared.hidden,
            intermediate_size=shared.intermediate,
            num_attention_heads=shared.heads,
            num_key_value_heads=shared.heads,
        )
    lengths_of = {"max_reply_words": shared.max_reply_words, "reply_scale": shared.reply_scale}
    train = synthetic_conversations(shared.train_examples, seed=1, **lengths_of)
    held_out = synthetic_conversations(shared.eval_examples, seed=2, **lengths_of)
    write_jsonl(scratch / "train.jsonl", train)
    write_jsonl(scratch / "eval.jsonl", held_out)
    (scratch / "setup.json").write_text(json.dumps(asdict(shared)))
    tokenizer = load_tokenizer(str(scratch / "model"))
    lengths = sorted(len(assistant_tokens(tokenizer, messages, 10**9)[0]) for messages in train)
    return {
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "tokens_p50": lengths[len(lengths) // 2],
        "tokens_p90": lengths[len(lengths) * 9 // 10],
        "tokens_mean": round(statistics.mean(lengths)),
        "tokens_max": lengths[-1],
        "truncated": sum(length > shared.max_length for length in lengths),
    }


def run() -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    from worker.model_loader import count_parameters

    shared = setup()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="phitune-bench-train-") as directory:
        scratch = Path(directory)
        data = prepare(scratch, shared)
        config = AutoConfig.from_pretrained(scratch / "model")
        parameters = count_parameters(config)
        peaks = [peak_matmul_flops(device)]
        rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for index in range(shared.rounds):
            order = SIDES[::-1] if index % 2 == 0 else SIDES  # the reference first in round 1
            for side in order:
                rounds[side].append(run_child(side, scratch))
        peaks.append(peak_matmul_flops(device))
    peak = max(peaks)

    def tokens_per_s(result: dict[str, Any]) -> float:
        return result["tokens"] / result["train_s"]

    def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
        rates = [tokens_per_s(result) for result in results]
        mfus = [
            model_flops(shared, config.vocab_size, result) / result["train_s"] / peak for result in results
        ]
        last = results[-1]
        return {
            "tokens_per_s": round(statistics.median(rates), 1),
            "wall_s": round(statistics.median(result["wall_s"] for result in results), 1),
            "peak_rss_mb": round(max(result["peak_rss_mb"] for result in results)),
            "eval_loss": round(statistics.mean(result["eval_loss"] for result in results), 4),
            "mfu": round(statistics.median(mfus), 3),
            "train_s": round(statistics.median(result["train_s"] for result in results), 1),
            "train_loss": round(last["train_loss"], 4),
            "tokens": last["tokens"],
            "loss_tokens": last["loss_tokens"],
            "steps": last["steps"],
            "precision": last["precision"],
            "recompute": last["recompute"],
            **({"peak_gpu_mb": round(last["peak_gpu_mb"])} if last["peak_gpu_mb"] is not None else {}),
            "tokens_per_s_range": [round(min(rates), 1), round(max(rates), 1)],
            # The machine's 1-minute load average before and after each round's training (2: both cores busy).
            "load_1m": [[round(value, 2) for value in result["load_1m"]] for result in results],
        }

    ours, reference = summary(rounds["ours"]), summary(rounds["reference"])
    ratios = [
        tokens_per_s(mine) / tokens_per_s(theirs)
        for mine, theirs in zip(rounds["ours"], rounds["reference"], strict=True)
    ]
    return {
        "speedup": round(statistics.median(ratios), 3),
        "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "eval_loss_ratio": round(ours["eval_loss"] / reference["eval_loss"], 4),
        "ours": ours,
        "reference": reference,
        "targets": {"speedup": ">= 2 on the CPU", "eval_loss_ratio": "<= 1.02", "mfu": ">= 0.30"},
        "peak_matmul_gflops": round(peak / 1e9, 1),
        "peak_matmul_gflops_range": [round(p / 1e9, 1) for p in (min(peaks), max(peaks))],
        "model": {
            "layers": shared.layers,
            "hidden": shared.hidden,
            "intermediate": shared.intermediate,
            "heads": shared.heads,
            "vocab": config.vocab_size,
            "parameters": parameters,
        },
        "data": data,
        "max_length": shared.max_length,
        "batch_size": shared.batch_size,
        "epochs": shared.epochs,
        "learning_rate": shared.learning_rate,
        "rounds": shared.rounds,
        "device": device,
        "threads": torch.get_num_threads(),
        "quick": shared is QUICK,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="One side of `python -m bench train` (internal).")
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("scratch", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(run_side(args.side, args.scratch)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
