"""Packing (training_config.packing): whole examples packed into rows of max_seq_length by TRL's best-fit
decreasing, each attending only to itself, with the labels of the unpacked examples; and the other batching
and memory options of the recipe's fast path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from app.specs import TrainingConfig
from tests.worker.conftest import PERSONA_FILE, Recorder
from tests.worker.test_data import CONVERSATION, trained_spans, write_jsonl
from tests.worker.test_recipe import (
    PEFT_CONFIG,
    TRAINING_CONFIG,
    recipe_inputs,
    # Collected here too, where they check the packed run of this module's `run` fixture.
    test_lora_weights_trained_and_base_weights_untouched,  # noqa: F401
    test_saved_adapter_reproduces_the_trained_model,  # noqa: F401
)
from worker import data as worker_data
from worker import hardware, packed_attention
from worker.data import load_tokenized_dataset, tokenize_example
from worker.memory_estimate import GIB, MemoryEstimate, decide_checkpointing
from worker.packed_attention import use_packed_sdpa
from worker.recipe import (
    RecipeInputs,
    RecipeTrainer,
    TrainingRun,
    build_trainer,
    build_trainer_args,
    describe_data,
    lora_parameter_count,
    train,
)
from worker.tokenizer import load_tokenizer

MAX_SEQ_LENGTH = 256  # the persona examples (70 to 180 tokens) pack two or three to a row
CPU = hardware.plan("cpu", parameters=10**6)


def packed_trainer(model_dir: Path, training_file: Path, output_dir: Path, **config) -> RecipeTrainer:
    """A trainer of the tiny model, with packing on unless `config` says otherwise, built but not trained."""
    training_config = TrainingConfig(**{"packing": True, "max_seq_length": MAX_SEQ_LENGTH, **config})
    inputs = RecipeInputs(
        base_model=str(model_dir),
        training_file=training_file,
        validation_file=None,
        training_config=training_config,
        peft_config=PEFT_CONFIG,
        output_dir=output_dir,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if training_config.packing or training_config.padding_free:
        use_packed_sdpa(model)  # as the recipe does
    tokenizer = load_tokenizer(str(model_dir))
    dataset = load_tokenized_dataset(training_file, tokenizer, max_seq_length=MAX_SEQ_LENGTH).dataset
    return build_trainer(model, tokenizer, inputs, CPU, dataset, None, [])


@pytest.fixture(scope="module")
def persona_trainer(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RecipeTrainer:
    return packed_trainer(tiny_model_dir, PERSONA_FILE, tmp_path_factory.mktemp("packed"))


@pytest.fixture(scope="module", params=["sdpa", "eager", packed_attention.NAME])
def base(request: pytest.FixtureRequest, tiny_model_dir: Path) -> PreTrainedModel:
    """The untrained tiny model in fp32: transformers' SDPA and eager attention, which see packed examples
    in the position_ids, and the recipe's packed SDPA, which sees them in the collator's cu_seq_lens_q."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=request.param).eval()


def packed_batches(trainer: RecipeTrainer, rows: int = 4) -> list[dict]:
    """The packed training set as the trainer's collator batches it, `rows` rows at a time."""
    dataset = trainer.train_dataset
    return [
        trainer.data_collator([dataset[index] for index in range(start, min(start + rows, len(dataset)))])
        for start in range(0, len(dataset), rows)
    ]


def forward_logits(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The logits of a batch of one row, without the cache, as the trainer runs (TRL's compute_loss passes
    use_cache=False): transformers looks for packed examples in the position_ids only without a cache."""
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0]


def token_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The loss of each token of a batch of one row: token t's logits scored against label t + 1 (0 where
    the label is -100)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = forward_logits(model, **inputs)[:-1]
    labels = batch["labels"][0, 1:]
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")


def segments(batch: dict) -> list[slice]:
    """The examples of a packed row, from its position_ids."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    return [slice(start, end) for start, end in zip(starts, starts[1:], strict=False)]


def alone(ids: list[int], labels: list[int]) -> dict:
    """One example as a batch of its own, as training without packing sees it."""
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "labels": torch.tensor([labels]),
    }


def example_losses(tokenizer: PreTrainedTokenizerBase) -> dict[tuple[int, ...], tuple[list[int], list[int]]]:
    """The persona examples by their token ids: ids and labels as built before packing."""
    data = load_tokenized_dataset(PERSONA_FILE, tokenizer, max_seq_length=MAX_SEQ_LENGTH).dataset
    return {
        tuple(ids): (ids, [token if trained else -100 for token, trained in zip(ids, mask, strict=True)])
        for ids, mask in zip(data["input_ids"], data["completion_mask"], strict=True)
    }


def test_persona_examples_are_packed_into_fewer_rows(persona_trainer: RecipeTrainer) -> None:
    dataset = persona_trainer.train_dataset
    assert 10 <= len(dataset) < 40
    assert sum(len(lengths) for lengths in dataset["seq_lengths"]) == 40  # every example, none split
    assert all(len(ids) <= MAX_SEQ_LENGTH for ids in dataset["input_ids"])
    batch = packed_batches(persona_trainer)[0]
    assert "attention_mask" not in batch  # else transformers would let the examples attend to each other
    assert batch["input_ids"].shape[0] == 1  # the rows of a batch are concatenated into one, without padding


def test_packed_loss_equals_the_unpacked_loss_example_by_example(
    persona_trainer: RecipeTrainer, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    examples = example_losses(tokenizer)
    seen = 0
    for batch in packed_batches(persona_trainer):
        losses = token_losses(base, batch)
        for segment in segments(batch):
            ids, labels = examples[tuple(batch["input_ids"][0, segment].tolist())]
            assert batch["labels"][0, segment].tolist()[1:] == labels[1:]  # the first is never trained
            packed = losses[
                segment.start : segment.stop - 1
            ].sum()  # its last token predicts the next example
            unpacked = token_losses(base, alone(ids, labels)).sum()
            torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == 40


def test_the_trainers_packed_loss_is_the_token_mean_of_the_unpacked_losses(
    persona_trainer: RecipeTrainer, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Through the trainer's own path: PEFT, TRL's fused LM head, the collator's extra keys."""
    model = persona_trainer.model
    model.eval()
    examples = example_losses(tokenizer)
    batch = packed_batches(persona_trainer)[0]
    with torch.no_grad():
        loss = persona_trainer.compute_loss(model, dict(batch))
    total, tokens = torch.tensor(0.0), 0
    for segment in segments(batch):
        ids, labels = examples[tuple(batch["input_ids"][0, segment].tolist())]
        total += token_losses(model, alone(ids, labels)).sum()
        tokens += sum(label != -100 for label in labels[1:])
    torch.testing.assert_close(loss, total / tokens, rtol=1e-5, atol=1e-6)


def test_padding_free_batches_train_exactly_as_padded_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The default batching: the examples of a padded batch, concatenated into one row, give its loss."""
    losses = []
    for padding_free in (False, True):
        trainer = packed_trainer(
            tiny_model_dir,
            PERSONA_FILE,
            tmp_path / str(padding_free),
            packing=False,
            padding_free=padding_free,
        )
        batch = trainer.data_collator([trainer.train_dataset[index] for index in range(8)])
        assert ("attention_mask" in batch) is not padding_free
        trainer.model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, dict(batch)))
    padded, padding_free = losses
    torch.testing.assert_close(padding_free, padded, rtol=1e-5, atol=1e-6)


def beside(trainer: RecipeTrainer, first: list[int], second: list[int]) -> dict:
    """`second` packed after `first` in one row, as the collator batches a packed row."""
    row = {"input_ids": first + second, "labels": first + second, "seq_lengths": [len(first), len(second)]}
    return trainer.data_collator([row])


def test_a_tokens_logits_do_not_change_when_another_example_is_packed_beside_it(
    persona_trainer: RecipeTrainer, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    first, second = (ids for ids, _ in list(example_losses(tokenizer).values())[:2])
    batch = beside(persona_trainer, first, second)
    on_its_own = forward_logits(base, input_ids=torch.tensor([second]))
    packed = forward_logits(base, **{key: value for key, value in batch.items() if key != "labels"})
    torch.testing.assert_close(packed[len(first) :], on_its_own, rtol=1e-5, atol=1e-5)


def test_an_all_ones_attention_mask_would_let_the_examples_attend_to_each_other(
    persona_trainer: RecipeTrainer, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The check above is not vacuous: given a mask of ones, transformers ignores the examples' boundaries;
    and so it does with the cache on, which the trainer turns off."""
    first, second = (ids for ids, _ in list(example_losses(tokenizer).values())[:2])
    batch = beside(persona_trainer, first, second)
    on_its_own = forward_logits(base, input_ids=torch.tensor([second]))
    ones = torch.ones_like(batch["input_ids"])
    leaked = forward_logits(
        base, input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=ones
    )
    assert (leaked[len(first) :] - on_its_own).abs().max() > 1e-2
    with torch.no_grad():
        cached = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True)
    assert (cached.logits[0, len(first) :] - on_its_own).abs().max() > 1e-2


def test_the_packed_sdpa_trains_exactly_as_the_masked_sdpa(
    persona_trainer: RecipeTrainer, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per example SDPA gives the loss and the gradients of SDPA under transformers' block-diagonal mask,
    without ever making that mask."""
    batch = packed_batches(persona_trainer)[0]
    gradients = []
    for attention in ("sdpa", packed_attention.NAME):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
        builds = packed_attention.DeferredMask.builds
        with monkeypatch.context() as patch:
            if attention == packed_attention.NAME:  # it attends per example: never through the masked SDPA
                patch.setattr(packed_attention, "sdpa_attention_forward", None)
            loss = model(**batch, use_cache=False).loss
        assert packed_attention.DeferredMask.builds == builds  # the (tokens in the batch)² mask: never made
        loss.backward()
        gradients.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    (masked_loss, masked), (packed_loss, packed) = gradients
    torch.testing.assert_close(packed_loss, masked_loss, rtol=1e-5, atol=1e-6)
    assert masked.keys() == packed.keys()
    for name in masked:
        torch.testing.assert_close(packed[name], masked[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("window", [4, 1000])
def test_an_example_longer_than_the_sliding_window_attends_through_the_window(
    persona_trainer: RecipeTrainer, tiny_model_dir: Path, window: int
) -> None:
    """Phi-3 attends within a sliding window: the packed attention gives the masked SDPA's logits whether
    an example is longer than the window (4 tokens) or not (1000)."""
    batch = {key: value for key, value in packed_batches(persona_trainer)[0].items() if key != "labels"}
    builds = packed_attention.DeferredMask.builds
    logits = [
        forward_logits(
            AutoModelForCausalLM.from_pretrained(
                tiny_model_dir, attn_implementation=attention, sliding_window=window
            ).eval(),
            **batch,
        )
        for attention in ("sdpa", packed_attention.NAME)
    ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    # Made once, for every layer, where an example is longer than the window; not made where none is.
    assert packed_attention.DeferredMask.builds - builds == (1 if window == 4 else 0)


@pytest.fixture(scope="module")
def weighted_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversations whose second reply has weight 0, prompt/completion and text records, and one example too
    long for max_seq_length."""
    weighted = [*CONVERSATION[:4], {**CONVERSATION[4], "weight": 0}]
    examples = [
        {"messages": CONVERSATION},
        {"messages": weighted},
        {"prompt": "Is the coffee hot?", "completion": "Aye, piping hot."},
        {"text": "Fair winds and strong coffee!"},
        {"messages": [*CONVERSATION[:2], {"role": "assistant", "content": "Arr! " * 200}]},
    ] * 3
    return write_jsonl(tmp_path_factory.mktemp("weighted") / "train.jsonl", examples)


@pytest.fixture(scope="module")
def weighted_trainer(
    tiny_model_dir: Path, weighted_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> RecipeTrainer:
    return packed_trainer(tiny_model_dir, weighted_file, tmp_path_factory.mktemp("weighted-run"))


def test_packed_labels_train_the_assistant_turns_of_weight_1_only(
    weighted_trainer: RecipeTrainer, weighted_file: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    expected = []
    for record in worker_data.read_jsonl(weighted_file):
        ids, mask = tokenize_example(record, tokenizer)
        # An example's first token is never a target, packed (its label is -100) or not (nothing precedes it).
        expected.append(trained_spans(tokenizer, ids[1:MAX_SEQ_LENGTH], mask[1:MAX_SEQ_LENGTH]))
    assert expected[0] == ["Arr, matey!<|end|>", "On the high seas, savvy?<|end|>"]
    assert expected[1] == ["Arr, matey!<|end|>"]  # the reply of weight 0 is not trained

    packed = []
    for batch in packed_batches(weighted_trainer):
        for segment in segments(batch):
            ids = batch["input_ids"][0, segment].tolist()
            labels = batch["labels"][0, segment].tolist()
            assert all(label in (token, -100) for token, label in zip(ids, labels, strict=True))
            packed.append(trained_spans(tokenizer, ids[1:], [int(label != -100) for label in labels[1:]]))
    assert sorted(packed) == sorted(expected)


def test_the_job_says_how_examples_were_packed_and_what_truncation_cut(
    weighted_trainer: RecipeTrainer, weighted_file: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    data = load_tokenized_dataset(weighted_file, tokenizer, max_seq_length=MAX_SEQ_LENGTH)
    full = [len(tokenize_example(record, tokenizer)[0]) for record in worker_data.read_jsonl(weighted_file)]
    cut = sum(max(length - MAX_SEQ_LENGTH, 0) for length in full)
    assert cut > 3 * 100 and data.num_truncated_tokens == cut  # the long conversation, three times
    assert 0 < data.num_truncated_trained_tokens < cut  # the long reply's <|end|> and all but its start

    config = TrainingConfig(packing=True, max_seq_length=MAX_SEQ_LENGTH)
    text, figures = describe_data(data, weighted_trainer, config)
    rows = len(weighted_trainer.train_dataset)
    assert figures == {
        "examples": 15,
        "tokens": data.num_tokens,
        "truncated_tokens": cut,
        "truncated_trained_tokens": data.num_truncated_trained_tokens,
        "dropped_examples": 0,
        "packed_rows": rows,
    }
    assert text.startswith(
        f"Packed 15 training examples ({data.num_tokens} tokens) into {rows} rows of up to 256"
    )
    assert f"max_seq_length=256 cut {cut} tokens" in text


# A packed run of the persona data: 40 examples in about 15 rows, in batches of 2 rows, for 4 epochs.
PACKED_CONFIG = {"packing": True, "max_seq_length": MAX_SEQ_LENGTH, "per_device_train_batch_size": 2}


@pytest.fixture(scope="module")
def calls() -> dict[str, int]:
    return {"tokenize_example": 0, "pack_dataset": 0}


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def run(
    tiny_model_dir: Path,
    recorder: Recorder,
    calls: dict[str, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainingRun:
    import trl.trainer.sft_trainer as sft_trainer

    def counted(module, name: str):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker_data, "tokenize_example", counted(worker_data, "tokenize_example"))
        patch.setattr(sft_trainer, "pack_dataset", counted(sft_trainer, "pack_dataset"))
        run = train(
            recipe_inputs(tiny_model_dir, tmp_path_factory.mktemp("attempt"), **PACKED_CONFIG), recorder
        )
    run.trainer.model.eval()
    return run


def test_a_packed_run_learns(run: TrainingRun, recorder: Recorder) -> None:
    first, last = recorder.events[0]["train_loss"], recorder.events[-1]["train_loss"]
    assert last < first - 1.0
    rows = len(run.trainer.train_dataset)
    assert run.result.steps == 4 * -(-rows // 2)
    assert recorder.events[-1]["epoch"] == pytest.approx(TRAINING_CONFIG.num_train_epochs)


def test_a_packed_run_counts_every_token_once_an_epoch(
    run: TrainingRun, tokenizer: PreTrainedTokenizerBase
) -> None:
    data = load_tokenized_dataset(PERSONA_FILE, tokenizer, max_seq_length=MAX_SEQ_LENGTH)
    assert run.result.trained_tokens == 4 * data.num_tokens  # the end-of-text token (the pad token) too


def test_examples_are_tokenised_and_packed_once_per_job_not_per_epoch(
    run: TrainingRun, calls: dict[str, int]
) -> None:
    assert calls == {"tokenize_example": 40, "pack_dataset": 1}


def test_the_packed_run_reports_its_rows_and_its_checkpointing_decision(
    run: TrainingRun, recorder: Recorder
) -> None:
    info = [(text, data) for level, text, data in recorder.messages if level == "info"]
    estimate_text, estimate = info[1]
    assert estimate_text.startswith("Estimated memory ")
    assert estimate_text.endswith(
        "without gradient checkpointing; gradient checkpointing off: the CPU is compute bound, and "
        "recomputing would only slow it"
    )
    assert estimate["gradient_checkpointing"] is False and estimate["free_memory_bytes"] is None
    assert not run.trainer.args.activation_checkpointing
    packing_text, packing = info[2]
    assert packing["packed_rows"] == len(run.trainer.train_dataset) and packing["examples"] == 40
    assert packing_text.startswith("Packed 40 training examples")


def test_batches_are_padding_free_by_default(tmp_path: Path) -> None:
    args = build_trainer_args(TrainingConfig(), tmp_path, CPU, evaluate=True)
    assert args.padding_free and not args.packing and args.train_sampling_strategy == "random"
    assert args.max_length is None  # TRL would not truncate padding-free batches; the data is truncated
    padded = build_trainer_args(TrainingConfig(padding_free=False), tmp_path, CPU, evaluate=True)
    assert not padded.padding_free and padded.max_length == 2048


def test_group_by_length_groups_unpacked_batches_only(tmp_path: Path) -> None:
    grouped = build_trainer_args(TrainingConfig(group_by_length=True), tmp_path, CPU, evaluate=True)
    assert grouped.train_sampling_strategy == "group_by_length" and not grouped.packing
    packed = build_trainer_args(
        TrainingConfig(group_by_length=True, packing=True), tmp_path, CPU, evaluate=True
    )
    assert packed.train_sampling_strategy == "random" and packed.packing
    assert packed.packing_strategy == "bfd" and packed.eval_packing is False  # validation stays unpacked


def test_the_estimate_counts_the_lora_weights_peft_will_add(
    persona_trainer: RecipeTrainer, tiny_model_dir: Path
) -> None:
    trained = sum(
        parameter.numel() for parameter in persona_trainer.model.parameters() if parameter.requires_grad
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert lora_parameter_count(base, PEFT_CONFIG) == trained
    qkv_only = PEFT_CONFIG.model_copy(update={"target_modules": ["self_attn.qkv_proj"]})
    assert lora_parameter_count(base, qkv_only) == 2 * 8 * (64 + 3 * 64)  # 2 layers, r · (in + out)


ESTIMATE = MemoryEstimate(weights=8 * GIB, trained_state=GIB, activations=20 * GIB)


@pytest.mark.parametrize(
    ("requested", "device", "free", "enabled"),
    [
        (None, "cpu", None, False),
        (None, "cuda", 40 * GIB, False),  # 21 GiB beyond the weights fit in 80% of 40
        (None, "cuda", 24 * GIB, True),  # not in 80% of 24
        (True, "cpu", None, True),
        (False, "cuda", 1 * GIB, False),
    ],
)
def test_gradient_checkpointing_follows_the_memory_estimate_unless_set(
    requested: bool | None, device: str, free: int | None, enabled: bool
) -> None:
    decision = decide_checkpointing(requested, torch.device(device), ESTIMATE, free)
    assert decision.enabled is enabled
    assert decision.figures() == {
        "gradient_checkpointing": enabled,
        "estimated_memory_bytes": 29 * GIB,
        "free_memory_bytes": free,
    }
    if requested is None and device == "cuda":
        fits = "does not fit" if enabled else "fits"
        assert (
            f"21.00 GiB beyond the weights {fits} in 80% of the GPU's {free / GIB:.2f} GiB free"
            in decision.reason
        )
