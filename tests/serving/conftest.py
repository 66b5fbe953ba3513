"""Fixtures of the serving tests: the tiny Phi-3, LoRA adapters with random weights, a stand-in for the API's
adapter route, inference servers under uvicorn, and reference completions from `PeftModel.generate`."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.config import Settings
from tests.serving.stub_store import adapter_store_app, serve_in_thread
from worker.adapter_archive import pack
from worker.model_loader import load_base_model
from worker.serving.server import create_inference_app
from worker.serving.settings import ServingSettings
from worker.tiny_model import make_random_adapter

BASE_MODEL = "tiny-phi3"
SERVING_TOKEN = "serving-test-token"  # the inference server's credential at the (stand-in) API
INFERENCE_TOKEN = "inference-test-token"  # the API's credential at the inference server
# Three adapters whose ranks differ, so that mixed batches pad ranks: plain; rsLoRA on attention only; and
# per-layer ranks and alphas.
ADAPTER_OPTIONS = {
    "ftjob-plain": {"seed": 1},
    "ftjob-attention": {"seed": 2, "r": 4, "target_modules": ["qkv_proj", "o_proj"], "use_rslora": True},
    "ftjob-patterns": {"seed": 3, "r": 8, "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"o_proj": 4}},
}
ADAPTERS = list(ADAPTER_OPTIONS)
PICKLED_ADAPTER = "ftjob-pickled"
# Batches compute bit for bit like single rows in fp32 on the CPU; bf16 kernels on a GPU round by batch shape.
exact_only_on_cpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="batched bf16 on a GPU rounds differently from single rows"
)


def load_model(model_dir: Path) -> PreTrainedModel:
    """The base model as the inference server loads it (device and dtype of this machine)."""
    return load_base_model(str(model_dir), for_training=False)[0]


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        adapter_id: make_random_adapter(tiny_model_dir, root / adapter_id, **options)
        for adapter_id, options in ADAPTER_OPTIONS.items()
    }


def pickled_archive(adapter_dir: Path, archive: Path) -> Path:
    """The adapter with its weights pickled (adapter_model.bin), as old PEFT versions saved them."""
    weights = io.BytesIO()
    torch.save({"lora_A.weight": torch.zeros(1)}, weights)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(adapter_dir / "adapter_config.json", arcname="adapter_config.json")
        member = tarfile.TarInfo("adapter_model.bin")
        member.size = len(weights.getvalue())
        tar.addfile(member, io.BytesIO(weights.getvalue()))
    return archive


@pytest.fixture(scope="session")
def archives(adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    packed = {
        adapter_id: pack(path, root / f"{adapter_id}.tar.gz") for adapter_id, path in adapter_dirs.items()
    }
    packed[PICKLED_ADAPTER] = pickled_archive(adapter_dirs["ftjob-plain"], root / f"{PICKLED_ADAPTER}.tar.gz")
    return packed


@pytest.fixture(scope="session")
def store_url(archives: dict[str, Path]) -> Iterator[str]:
    """A real HTTP server answering GET /internal/v1/adapters/{id} like the API."""
    with serve_in_thread(adapter_store_app(archives, SERVING_TOKEN)) as url:
        yield url


@dataclass
class InferenceServer:
    url: str
    app: FastAPI
    headers = {"Authorization": f"Bearer {INFERENCE_TOKEN}"}  # as the API calls it

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=60)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", headers=self.headers).json()


@pytest.fixture(scope="session")
def start_server(
    tiny_model_dir: Path, store_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., InferenceServer]]:
    """Starts inference servers (uvicorn, real HTTP) that fetch adapters from the store, or from `api_url`."""
    with contextlib.ExitStack() as servers:

        def start(max_loaded_adapters: int, api_url: str | None = None) -> InferenceServer:
            settings = Settings(
                data_dir=tmp_path_factory.mktemp("inference-data"),
                base_models={BASE_MODEL: str(tiny_model_dir)},
                api_url=api_url or store_url,
                serving_token=SERVING_TOKEN,
                inference_token=INFERENCE_TOKEN,
                max_loaded_adapters=max_loaded_adapters,
            )
            # The test process keeps its torch threads: the other tests share it.
            app = create_inference_app(
                settings, serving=ServingSettings(torch_threads=torch.get_num_threads())
            )
            return InferenceServer(servers.enter_context(serve_in_thread(app)), app)

        yield start


@pytest.fixture(scope="session")
def server(start_server: Callable[[int], InferenceServer]) -> InferenceServer:
    return start_server(8)


class References:
    """Completions of in-process `PeftModel.generate` (greedy), the output the server must reproduce."""

    def __init__(self, model_dir: Path, adapter_dirs: dict[str, Path], tokenizer: PreTrainedTokenizerBase):
        self._model_dir = model_dir
        self._adapter_dirs = adapter_dirs
        self._tokenizer = tokenizer
        self._models: dict[str | None, torch.nn.Module] = {}

    def model(self, adapter_id: str | None) -> torch.nn.Module:
        if adapter_id not in self._models:
            model = load_model(self._model_dir)
            if adapter_id is not None:
                model = PeftModel.from_pretrained(model, self._adapter_dirs[adapter_id])
            self._models[adapter_id] = model.eval()
        return self._models[adapter_id]

    def add(self, adapter_id: str, model: torch.nn.Module) -> None:
        """Take `model` as the reference of `adapter_id`, for adapters PeftModel cannot load."""
        self._models[adapter_id] = model.eval()

    def completion(self, adapter_id: str | None, messages: list[dict], max_tokens: int) -> dict:
        prompt = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        ids = torch.tensor([prompt], device=self.model(adapter_id).device)
        with torch.no_grad():
            output = self.model(adapter_id).generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
            )
        generated = output[0, len(prompt) :].tolist()
        ended = generated[-1] in self.model(adapter_id).generation_config.eos_token_id
        return {
            "text": self._tokenizer.decode(generated, skip_special_tokens=True),
            "finish_reason": "stop" if ended else "length",
            "prompt_tokens": len(prompt),
            "completion_tokens": len(generated),
        }


@pytest.fixture(scope="session")
def references(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tokenizer: PreTrainedTokenizerBase
) -> References:
    return References(tiny_model_dir, adapter_dirs, tokenizer)


def generate_body(adapter_id: str | None, content: str, **options) -> dict:
    return {
        "base_model": BASE_MODEL,
        "adapter_id": adapter_id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 48,
        "temperature": 0,
    } | options


def read_stream(response: httpx.Response) -> tuple[list[str], dict]:
    """The deltas and the final event of a /generate stream."""
    deltas, final = [], None
    for line in response.iter_lines():
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if "delta" in event:
                deltas.append(event["delta"])
            else:
                final = event
    return deltas, final
