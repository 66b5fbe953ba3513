"""The CPU's LM head (worker.lm_head) against TRL's fused head it replaces: the same loss, per-token
log-probabilities, metrics and gradients, for the labelled positions only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from worker import lm_head

OUTPUTS = ("log_probs", "entropy", "is_top1")


def headed_model(model_dir: Path, head: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    add_fused_lm_head(model, outputs=OUTPUTS)  # what SFTTrainer does
    if head == "cpu":
        assert lm_head.applies_to(model)
        lm_head.score_labelled_positions_only(model)
    return model


def batch(length: int = 48, unlabelled: int = 20) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 500, (2, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :unlabelled] = -100  # a prompt: never trained on, never projected by the CPU head
    labels[1, -5:] = -100
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(100)])
def test_the_cpu_head_gives_trls_loss_metrics_and_gradients(
    tiny_model_dir: Path, num_items_in_batch: torch.Tensor | None
) -> None:
    results = {}
    for head in ("trl", "cpu"):
        model = headed_model(tiny_model_dir, head)
        output = model(**batch(), fused_lm_head=True, num_items_in_batch=num_items_in_batch)
        output.loss.backward()
        gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[head] = (output, gradients)
    (trl, trl_gradients), (cpu, cpu_gradients) = results["trl"], results["cpu"]
    torch.testing.assert_close(cpu.loss, trl.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(cpu.label_mask, trl.label_mask)
    torch.testing.assert_close(cpu.log_probs, trl.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.entropy, trl.entropy, rtol=1e-4, atol=1e-4)
    assert torch.equal(cpu.is_top1, trl.is_top1)
    assert cpu.log_sum_sq_probs is None and cpu.mean_logits is None
    assert cpu_gradients.keys() == trl_gradients.keys() and cpu_gradients
    for name, gradient in trl_gradients.items():
        torch.testing.assert_close(cpu_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_an_unlabelled_batch_is_a_zero_loss_that_still_backpropagates(tiny_model_dir: Path) -> None:
    model = headed_model(tiny_model_dir, "cpu")
    output = model(**batch(unlabelled=48), fused_lm_head=True)
    assert output.loss.item() == 0.0
    output.loss.backward()


def test_without_the_fused_flag_the_model_is_the_model(tiny_model_dir: Path) -> None:
    """Evaluation of logits and generation go through the model's own forward."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = headed_model(tiny_model_dir, "cpu").eval()
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits)
        torch.testing.assert_close(model(**inputs).loss, plain(**inputs).loss)
    prompt = inputs["input_ids"][:1, :8]
    assert torch.equal(
        model.generate(prompt, max_new_tokens=4, do_sample=False),
        plain.generate(prompt, max_new_tokens=4, do_sample=False),
    )


def test_a_model_whose_logits_are_scaled_keeps_trls_head(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0
    assert not lm_head.applies_to(model)
