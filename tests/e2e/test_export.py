"""The merged-model export through real processes: `phitune api` and a `phitune worker` on the embedded
defaults; a job trains the tiny Phi-3, `phitune jobs export --wait -o DIR` has the worker merge it, and the
directory it extracts loads with `AutoModelForCausalLM.from_pretrained` and generates what base + adapter
generates, token for token."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import Service, api_alone, phitune
from tests.e2e.test_fine_tune import QUICK_LORA, QUICK_TRAINING, create_job, wait_final
from worker.tokenizer import load_tokenizer

pytestmark = pytest.mark.e2e


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """The API and one worker, exports sharded small enough that the tiny model has several shards."""
    for running in api_alone(tmp_path / "data", export_max_shard_size="200KB"):
        running.start("worker", "worker")
        yield running


def greedy(model: torch.nn.Module, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0].tolist()


def test_cli_exports_a_merged_model_that_generates_as_base_plus_adapter(
    service: Service, tmp_path: Path
) -> None:
    with service.client as client:
        job = create_job(
            client, training_config={**QUICK_TRAINING, "num_train_epochs": 1}, peft_config=QUICK_LORA
        )
        job = wait_final(service, job["id"])
        assert job["status"] == "succeeded", f"{job['error']}\n{service.tail_logs()}"
        adapter = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
    output = tmp_path / "merged"
    env = {**service.env, "PHITUNE_API_KEY": service.api_key}
    printed = phitune("jobs", "export", job["id"], "-o", str(output), "--json", env=env, timeout=600)
    assert '"status": "succeeded"' in printed, service.tail_logs()
    assert (
        len(list(output.glob("model-*-of-*.safetensors"))) > 1 and (output / "chat_template.jinja").exists()
    )

    base_dir = service.data_dir / "models" / "tiny-phi3"
    adapter_dir = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(adapter.content)) as tar:
        tar.extractall(adapter_dir, filter="data")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    tokenizer = load_tokenizer(str(output))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    assert greedy(merged, ids) == greedy(reference, ids)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
