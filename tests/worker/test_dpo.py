"""DPO, run for real: the tiny Phi-3 learns to prefer the pirate answers of examples/preference.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from app.dataset_format import PreferenceRecord
from app.internal.contracts import DPO_METRICS
from app.specs import DpoConfig, PeftConfig, TrainingConfig
from tests.worker.conftest import Recorder, fresh_base
from worker import resume_state
from worker.data import load_preference_dataset, read_jsonl, tokenize_preference
from worker.dpo import run_dpo, train_dpo
from worker.recipe import RecipeInputs, TrainingRun, build_lora_config, run_recipe

PREFERENCE_FILE = Path(__file__).parents[2] / "examples" / "preference.jsonl"
# 16 pairs in batches of 4: 4 steps an epoch, 12 in all; logged every 2, evaluated every 4, a checkpoint at 8.
TRAINING_CONFIG = TrainingConfig(
    learning_rate=5e-3,
    num_train_epochs=3,
    per_device_train_batch_size=4,
    warmup_ratio=0,
    logging_steps=2,
    eval_steps=4,
    save_steps=8,
    seed=11,
)
PEFT_CONFIG = PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0)
DPO = DpoConfig(beta=0.1)


def dpo_inputs(base: Path, output_dir: Path, validation_file: Path | None, **overrides) -> RecipeInputs:
    return RecipeInputs(
        base_model=str(base),
        training_file=PREFERENCE_FILE,
        validation_file=validation_file,
        training_config=TRAINING_CONFIG.model_copy(update=overrides),
        peft_config=PEFT_CONFIG,
        output_dir=output_dir,
        dpo=DPO,
    )


@pytest.fixture(scope="module")
def validation_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("validation") / "validation.jsonl"
    path.write_text("".join(PREFERENCE_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:4]))
    return path


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def run(
    tiny_model_dir: Path, validation_file: Path, recorder: Recorder, tmp_path_factory: pytest.TempPathFactory
) -> TrainingRun:
    run = train_dpo(dpo_inputs(tiny_model_dir, tmp_path_factory.mktemp("attempt"), validation_file), recorder)
    run.trainer.model.eval()
    return run


def answer_log_probs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[tuple[float, float]]:
    """log p(preferred answer | input) and log p(non-preferred answer | input) of every pair of the file."""
    sums = []
    for record in read_jsonl(PREFERENCE_FILE):
        assert isinstance(record, PreferenceRecord)
        prompt, chosen, rejected = tokenize_preference(record, tokenizer)
        pair = []
        for answer in (chosen, rejected):
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            targets = ids[0, 1:]
            picked = log_probs.gather(-1, targets[:, None])[:, 0]
            pair.append(picked[len(prompt) - 1 :].sum().item())
        sums.append((pair[0], pair[1]))
    return sums


def margins(base: list[tuple[float, float]], tuned: list[tuple[float, float]]) -> float:
    """The mean DPO reward margin, beta · (log-ratio of the preferred answer − that of the other)."""
    return sum(
        DPO.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        for (ref_chosen, ref_rejected), (chosen, rejected) in zip(base, tuned, strict=True)
    ) / len(base)


def test_the_pairs_are_tokenised_as_the_recipe_trains_a_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    record = read_jsonl(PREFERENCE_FILE)[0]
    assert isinstance(record, PreferenceRecord)
    prompt, chosen, rejected = tokenize_preference(record, tokenizer)
    assert tokenizer.decode(prompt).rstrip().endswith("<|assistant|>")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert chosen[-1] == rejected[-1] == end  # the answer and the end of its turn, nothing after
    assert tokenizer.decode(chosen[:-1]).strip() == record.preferred.content
    assert tokenizer.decode(rejected[:-1]).strip() == record.non_preferred.content


def test_max_seq_length_cuts_the_answers_and_drops_pairs_without_room(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    full = load_preference_dataset(PREFERENCE_FILE, tokenizer, max_seq_length=2048)
    prompt = min(len(ids) for ids in full.dataset["prompt_ids"])
    cut = load_preference_dataset(PREFERENCE_FILE, tokenizer, max_seq_length=prompt + 3)
    assert cut.num_dropped == sum(len(ids) >= prompt + 3 for ids in full.dataset["prompt_ids"])
    assert all(len(ids) <= 3 for ids in [*cut.dataset["chosen_ids"], *cut.dataset["rejected_ids"]])
    assert cut.num_truncated_tokens > 0
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="preference pairs"):
        load_preference_dataset(chat, tokenizer, max_seq_length=64)


def test_dpo_raises_the_reward_margin_and_the_served_adapter_prefers_the_preferred_answers(
    run: TrainingRun, tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, capsys
) -> None:
    base = fresh_base(tiny_model_dir)
    before = answer_log_probs(base, tokenizer)
    # The adapter as the inference server applies it: the saved PEFT files over the base.
    served = PeftModel.from_pretrained(fresh_base(tiny_model_dir), str(run.result.adapter_dir)).eval()
    after = answer_log_probs(served, tokenizer)
    preferred_before = sum(chosen > rejected for chosen, rejected in before)
    preferred_after = sum(chosen > rejected for chosen, rejected in after)
    ratio_before = sum(chosen - rejected for chosen, rejected in before) / len(before)
    ratio_after = sum(chosen - rejected for chosen, rejected in after) / len(after)
    margin = margins(before, after)
    with capsys.disabled():
        print(
            f"\nDPO figures: reward margin 0 (the reference) -> {margin:.3f}; mean log p(preferred) - "
            f"log p(non-preferred) {ratio_before:.3f} -> {ratio_after:.3f}; pairs preferred "
            f"{preferred_before}/{len(before)} -> {preferred_after}/{len(after)}"
        )
    assert margin > 0.5
    assert ratio_after > ratio_before
    assert preferred_after == len(after)


def test_metrics_events_carry_the_loss_and_the_rewards(run: TrainingRun, recorder: Recorder) -> None:
    steps = [event["step"] for event in recorder.events]
    assert steps == [2, 4, 6, 8, 10, 12]
    for event in recorder.events:
        assert {f"train_{name}" for name in DPO_METRICS.values()} <= event.keys()
        assert event["train_loss"] is not None
    evaluated = [event for event in recorder.events if event.get("eval_loss") is not None]
    assert [event["step"] for event in evaluated] == [4, 8, 12]
    assert all(event[f"eval_{name}"] is not None for event in evaluated for name in DPO_METRICS.values())
    first, last = recorder.events[0], recorder.events[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["train_rewards_margins"] > first["train_rewards_margins"]
    assert last["eval_rewards_margins"] > evaluated[0]["eval_rewards_margins"]
    assert last["train_rewards_accuracies"] == 1.0


def test_the_reference_is_the_base_with_the_adapter_disabled(run: TrainingRun, tiny_model_dir: Path) -> None:
    trainer = run.trainer
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" copy of the adapter either
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad(), trainer.model.disable_adapter():
        disabled = trainer.model(input_ids=ids).logits
        base = fresh_base(tiny_model_dir)(input_ids=ids).logits
    assert torch.allclose(disabled, base, atol=1e-5)


def test_checkpoints_and_the_adapter_are_peft_adapters(run: TrainingRun, recorder: Recorder) -> None:
    assert [checkpoint["step"] for checkpoint in recorder.checkpoints] == [8]
    checkpoint = recorder.checkpoints[0]
    assert checkpoint["metrics"]["valid_loss"] is not None
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= checkpoint["files"].keys()
    card = (run.result.adapter_dir / "README.md").read_text()
    assert "DPOTrainer" in card and '"beta": 0.1' in card
    assert run.result.formats == ["peft"] and run.result.steps == 12


def test_a_paused_dpo_job_resumes_where_it_stopped_and_trains_the_same_adapter(
    run: TrainingRun, tiny_model_dir: Path, tmp_path: Path
) -> None:
    paused = Recorder(hand_back_at=6)
    first = run_dpo(dpo_inputs(tiny_model_dir, tmp_path / "first", None, save_steps=None), paused)
    assert first.handed_back == "pause" and list(paused.states) == [6]
    state = tmp_path / "state"
    shutil.copytree(paused.states[6], state)
    assert resume_state.read_manifest(state).step == 6
    resumed = Recorder()
    inputs = dpo_inputs(tiny_model_dir, tmp_path / "second", None, save_steps=None)
    inputs.resume_from = state
    result = run_dpo(inputs, resumed)
    assert [event["step"] for event in resumed.events] == [8, 10, 12]
    assert result.steps == 12 and result.adapter_dir is not None
    # As the uninterrupted run (whose evaluations and checkpoint change no weight) trained it.
    resumed_weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    uninterrupted = load_file(run.result.adapter_dir / "adapter_model.safetensors")
    assert resumed_weights.keys() == uninterrupted.keys()
    assert all(
        torch.allclose(resumed_weights[name], uninterrupted[name], atol=1e-6) for name in uninterrupted
    )


def test_qlora_dpo_trains_over_a_4bit_base(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    inputs = dpo_inputs(tiny_model_dir, tmp_path, None, max_steps=6, save_steps=None)
    inputs.peft_config = PEFT_CONFIG.model_copy(update={"quantization": "4bit"})
    recorder = Recorder()
    run = train_dpo(inputs, recorder)
    qkv_proj = run.trainer.model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv_proj, bnb.nn.Linear4bit)
    first, last = recorder.events[0], recorder.events[-1]
    assert last["train_rewards_margins"] > first["train_rewards_margins"]
    assert last["train_loss"] < first["train_loss"]
    # The adapter serves over the unquantised base, and prefers the preferred answers more than the base does.
    base = answer_log_probs(fresh_base(tiny_model_dir), tokenizer)
    served = PeftModel.from_pretrained(fresh_base(tiny_model_dir), str(run.result.adapter_dir)).eval()
    assert margins(base, answer_log_probs(served, tokenizer)) > 0


@pytest.fixture(scope="module")
def supervised_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter with LoRA weights of its own (random, as a supervised job's are trained), to continue
    from."""
    torch.manual_seed(3)
    lora = build_lora_config(PEFT_CONFIG).__class__(
        **{**build_lora_config(PEFT_CONFIG).to_dict(), "init_lora_weights": False}
    )
    directory = tmp_path_factory.mktemp("supervised") / "adapter"
    get_peft_model(fresh_base(tiny_model_dir), lora).save_pretrained(str(directory))
    return directory


def test_a_dpo_job_continues_from_an_adapter_against_it_as_the_reference(
    tiny_model_dir: Path, supervised_adapter: Path, tmp_path: Path
) -> None:
    inputs = dpo_inputs(tiny_model_dir, tmp_path, None, max_steps=4, save_steps=None, init_from="ft:sft")
    inputs.init_from = supervised_adapter
    recorder = Recorder()
    run = train_dpo(inputs, recorder)
    model = run.trainer.model.eval()
    assert any(
        text.startswith("Training starts from the LoRA weights of ft:sft") for _, text, _ in recorder.messages
    )
    # The reference is the adapter continued from, as a frozen copy over the same base.
    assert run.trainer.ref_model is None and sorted(model.peft_config) == ["default", "ref"]
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    continued = PeftModel.from_pretrained(fresh_base(tiny_model_dir), str(supervised_adapter)).eval()
    with torch.no_grad():
        model.set_adapter("ref")
        reference = model(input_ids=ids).logits
        model.set_adapter("default")
        expected = continued(input_ids=ids).logits
    assert torch.allclose(reference, expected, atol=1e-5)
    # Training started from its weights and moved them; only the trained adapter ships.
    start = load_file(supervised_adapter / "adapter_model.safetensors")
    shipped = load_file(run.result.adapter_dir / "adapter_model.safetensors")
    assert shipped.keys() == start.keys()
    moved = [(shipped[name] - start[name]).abs().max().item() for name in start]
    assert max(moved) > 0 and min(moved) < 0.5  # trained on, not from scratch
    assert not (run.result.adapter_dir / "ref").exists()
    assert recorder.events[0]["train_rewards_margins"] != 0


def test_a_continued_dpo_job_resumes_against_the_same_reference(
    tiny_model_dir: Path, supervised_adapter: Path, tmp_path: Path
) -> None:
    def inputs(output_dir: Path) -> RecipeInputs:
        continued = dpo_inputs(
            tiny_model_dir, output_dir, None, max_steps=4, save_steps=None, init_from="ft:sft"
        )
        continued.init_from = supervised_adapter  # fetched by every attempt of a DPO job (worker.tasks)
        return continued

    whole = run_dpo(inputs(tmp_path / "whole"), Recorder())
    paused = Recorder(hand_back_at=2)
    assert run_dpo(inputs(tmp_path / "first"), paused).handed_back == "pause"
    second = inputs(tmp_path / "second")
    second.resume_from = paused.states[2]
    resumed = Recorder()
    result = run_dpo(second, resumed)
    assert [event["step"] for event in resumed.events] == [4]
    assert whole.adapter_dir is not None and result.adapter_dir is not None
    expected = load_file(whole.adapter_dir / "adapter_model.safetensors")
    got = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.allclose(got[name], expected[name], atol=1e-6) for name in expected)


def test_the_supervised_recipe_refuses_a_dpo_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SFTTrainer does not train"):
        run_recipe(dpo_inputs(tiny_model_dir, tmp_path, None), Recorder())
