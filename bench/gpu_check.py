"""GPU check: Phi-3-mini's config with random weights on one GPU: training speed against the reference recipe,
serving throughput on 8 adapters, and a correctness check through the real processes.

    python -m bench gpu_check                  # on one GPU: all 32 layers, bf16, within DEADLINE_S
    bench/gpu_check.sh [OPTIONS]               # the same on a machine without internet: installs the wheels
                                               # carried in bench/wheels (python -m bench.gpu_wheels) first
    python -m bench.gpu_check --only speed     # one part: speed, or serve (the serving figure + correctness)
    python -m bench.gpu_check --tiny           # every section on the CPU with a narrow model, to rehearse it

It writes one random-weight model with the Hub's Phi-3-mini-4k-instruct config and the real vocabulary
(`tests/real_phi3.py`; the speed of training does not depend on the weights' values) and runs these sections:

speed, per maximum length (2048, 4096) and mode (`lora`: bf16 LoRA as the Phi-3 card configures it;
    `qlora-4bit`: the same LoRA over an NF4 base): `python -m bench train`'s two sides, each in a process of
    its own (`bench.train.run_child`): phitune's worker path and the reference recipe, on the same synthetic
    skewed chat set (`bench.train.synthetic_conversations`, replies scaled so that the tail reaches the
    maximum length) for SPEED_STEPS steps of 4 conversations. Per side: `tokens_per_s` (real, non-padding
    tokens per second over the steps after the first WARMUP_STEPS, timed at each step's end after waiting for
    the GPU: `bench.train.install_step_clock`), `tokens_per_s_with_warmup` (over the trainer's whole
    train_runtime), `peak_gpu_mb` (torch.cuda.max_memory_allocated of the side's training), `mfu` (model
    FLOPs per second, `bench.train.training_flops`, ÷ the card's bf16 dense peak: `peak` says which), and
    `speedup` = ours ÷ the reference's tokens_per_s.
multi_adapter: 8 concurrent completions of MAX_TOKENS tokens on 8 different adapters, aggregate tokens/s
    through `phitune api` + `phitune inference` (`bench.inference.serving`). The 8 adapters are a LoRA phitune
    trained on this model and 7 copies with scaled LoRA B matrices: distinct weights of the same shape (the
    serving work does not depend on their values).
serve: `phitune serve` (API, worker and inference server as separate processes) trains a LoRA job, a QLoRA
    4-bit and a QLoRA 8-bit job and reports each job's first event (device, dtype, attention kernel,
    estimated memory) and its measured peak memory; the LoRA model's greedy completion through the API is
    compared token for token with in-process `PeftModel.generate` on the downloaded adapter; 32 concurrent
    completions, and the inference server's memory from its /stats.

The whole check must end within 8 minutes: it runs the sections in the order speed at the first length,
multi_adapter, serve, speed at the other lengths, each only if its estimated time (ESTIMATES_S, or what the
same mode took at a shorter length) still fits before the deadline (DEADLINE_S after the start), and it kills
what runs at the deadline. A section left out is named in `skipped`, with why. It prints one JSON line
(child processes write to stderr); `ok` is true when every section that ran passed. Without bitsandbytes the
QLoRA sections and jobs are skipped and said to be; without any other package it needs, nothing runs and
`missing` names them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from app.service_auth import bearer
from phitune.launch import REPO, free_port, phitune_command, run_phitune, wait_healthy

MODEL_ID = "phi3-check"
PERSONA = REPO / "examples" / "persona.jsonl"
# Import names of what the processes and this script need, and the distributions that provide them.
REQUIRED = {
    "fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
    "pydantic": "pydantic", "pydantic_settings": "pydantic-settings", "sqlalchemy": "sqlalchemy",
    "alembic": "alembic", "celery": "celery", "kombu": "kombu", "httpx": "httpx",
    "prometheus_client": "prometheus-client", "click": "click", "orjson": "orjson",
    "huggingface_hub": "huggingface-hub", "tenacity": "tenacity", "torch": "torch",
    "transformers": "transformers", "tokenizers": "tokenizers", "peft": "peft", "trl": "trl",
    "datasets": "datasets", "accelerate": "accelerate", "safetensors": "safetensors", "loralib": "loralib",
    "gguf": "gguf",  # tests/phi3_tokenizer.py reads the real vocabulary from its GGUF fixture
}  # fmt: skip
QLORA_PACKAGE = (
    "bitsandbytes"  # only the QLoRA sections and jobs need it (too big to carry: bench.gpu_wheels)
)

DEADLINE_S = 450  # 7.5 minutes: the last section's processes stop within the 8 minutes
TINY_DEADLINE_S = 1200  # the CPU rehearsal, on a loaded 2-core machine
# Estimated seconds of each section on an H100/H200 (the CPU rehearsal: TINY_ESTIMATES_S), to start a section
# only where it fits. A speed pair is both sides: two processes that import, load 7.6 GB and train.
ESTIMATES_S = {"model": 40, "speed lora": 80, "speed qlora-4bit": 100, "multi_adapter": 60, "serve": 210}
TINY_ESTIMATES_S = {"model": 20, "speed lora": 60, "speed qlora-4bit": 70, "multi_adapter": 60, "serve": 200}
JOB_SECONDS = 150  # a serve job still running then is cancelled
SERVE_STEP_S = 20  # a serve job, or the greedy and concurrent checks, start only with this much time left

LENGTHS = (2048, 4096)
TINY_LENGTHS = (128, 256)
MODES = {"lora": None, "qlora-4bit": "4bit"}  # speed section mode -> quantization
BATCH_SIZE = 4  # the card's
SPEED_STEPS = 24
WARMUP_STEPS = 4  # left out of tokens_per_s: CUDA and cuBLAS set-up, the allocator growing
TINY_SPEED_STEPS, TINY_WARMUP_STEPS = 6, 2
SPEED_LEARNING_RATE = 2e-4  # phitune's default (the card's 5e-6 changes nothing of the speed)
# The card's bf16 dense tensor-core peak, by a part of the device name (first match wins).
CARD_PEAK_TFLOPS = (
    ("H100 PCIe", 756), ("H100 NVL", 835), ("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362),
)  # fmt: skip

JOBS = {"lora": {}, "qlora-4bit": {"quantization": "4bit"}, "qlora-8bit": {"quantization": "8bit"}}
PROMPT = [{"role": "user", "content": "Who are you?"}]
GREEDY_TOKENS = 32
CONCURRENT = 32
CONCURRENT_TOKENS = 128
ADAPTERS = 8
MAX_TOKENS, TINY_MAX_TOKENS = 128, 16
ADAPTER_ROUNDS, TINY_ADAPTER_ROUNDS = 3, 1


def missing_packages() -> list[str]:
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def has_qlora() -> bool:
    return importlib.util.find_spec(QLORA_PACKAGE) is not None


class Budget:
    """The check's deadline: a section starts only if its estimate fits in the time left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.skipped: dict[str, str] = {}

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def allows(self, section: str, estimate: float) -> bool:
        if self.left() >= estimate:
            return True
        self.skipped[section] = f"needs ~{estimate:.0f} s, {self.left():.0f} s left before the deadline"
        return False


def run(
    tiny: bool = False,
    layers: int | None = None,
    steps: int = 20,
    only: str | None = None,
    speed_steps: int | None = None,
    lengths: tuple[int, ...] | None = None,
    modes: tuple[str, ...] | None = None,
    deadline: float | None = None,
) -> dict:
    """The check; `only` is "speed" or "serve" (the multi_adapter and serve sections), `steps` each serve
    job's. What the processes print goes to stderr."""
    with stdout_to_stderr():
        return check_all(tiny, layers, steps, only, speed_steps, lengths, modes, deadline)


def check_all(
    tiny: bool,
    layers: int | None,
    steps: int,
    only: str | None,
    speed_steps: int | None,
    lengths: tuple[int, ...] | None,
    modes: tuple[str, ...] | None,
    deadline: float | None,
) -> dict:
    started = time.monotonic()
    budget = Budget(deadline or (TINY_DEADLINE_S if tiny else DEADLINE_S))
    result: dict[str, Any] = {"tiny": tiny, "deadline_seconds": budget.seconds}
    if missing := missing_packages():
        return {**result, "ok": False, "missing": missing, "hint": "carry them as wheels: bench.gpu_wheels"}
    if tiny:  # the rehearsal's processes train and serve on the CPU, even on a GPU host
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if not tiny and not torch.cuda.is_available():
        return {**result, "ok": False, "error": "no usable GPU here; run with --tiny to rehearse on the CPU"}
    device = "cuda" if not tiny else "cpu"
    modes = modes or tuple(MODES)
    if not has_qlora():
        result["missing_optional"] = [QLORA_PACKAGE]
        for mode in [mode for mode in modes if MODES[mode]]:
            budget.skipped[f"speed {mode}"] = f"{QLORA_PACKAGE} is not installed"
        modes = tuple(mode for mode in modes if not MODES[mode])
    estimates = TINY_ESTIMATES_S if tiny else ESTIMATES_S
    lengths = lengths or (TINY_LENGTHS if tiny else LENGTHS)
    speed: dict[str, Any] = {}
    took: dict[str, float] = {}

    def guarded(section: Any, *args: Any) -> dict[str, Any]:
        """A section's result, or the error that stopped it: the later sections still run."""
        try:
            return section(*args)
        except Exception as error:
            return {"error": repr(error)}

    def speed_at(length: int) -> None:
        for mode in modes:
            name = f"{mode}@{length}"
            # What the same mode took at the shortest length, for the longer ones.
            estimate = took.get(mode, estimates[f"speed {mode}"]) * (length / min(lengths)) ** 0.5
            if budget.allows(f"speed {name}", estimate):
                begun = time.monotonic()
                scratch = root / f"speed-{name}"
                speed[name] = guarded(
                    speed_pair, model_dir, scratch, length, mode, tiny, speed_steps, result, budget
                )
                took.setdefault(mode, time.monotonic() - begun)

    def serve_adapters(adapter_dir: Path) -> None:
        if budget.allows("multi_adapter", estimates["multi_adapter"]):
            result["multi_adapter"] = guarded(
                multi_adapter, model_dir, adapter_dir, root / "multi", tiny, budget
            )

    with tempfile.TemporaryDirectory(prefix="phitune-gpu-check-") as scratch:
        root = Path(scratch)
        try:
            model_dir = make_model(root / "model", tiny=tiny, layers=layers)
            result["model"] = {"layers": layers or (2 if tiny else 32), "seconds": since(started)}
            if only != "serve":
                result["peak"] = peak_flops(device)
                result["speed"] = speed
                speed_at(lengths[0])
            if only != "speed":
                # A LoRA phitune trained on this model: the speed section's, else the serve LoRA job's.
                trained = next(iter(sorted(root.glob("speed-*/ours/adapter"))), None)
                if trained is not None:
                    serve_adapters(trained)
                if budget.allows("serve", estimates["serve"]):
                    result["serve"] = serve(model_dir, root, tiny, steps, budget)
                if trained is None and (root / "adapter").exists():
                    serve_adapters(root / "adapter")
                elif trained is None:
                    budget.skipped.setdefault("multi_adapter", "no trained adapter to serve")
            if only != "serve":
                for length in lengths[1:]:
                    speed_at(length)
        except Exception as error:  # the model could not be written, or the peak measured
            result["error"] = repr(error)
    result["skipped"] = budget.skipped
    result["wall_seconds"] = since(started)
    result["ok"] = passed(result)
    return result


def since(start: float) -> float:
    return round(time.monotonic() - start, 1)


def passed(result: dict) -> bool:
    """Every section that ran passed, and one did."""
    speed = list((result.get("speed") or {}).values())
    checks = [pair.get("speedup") is not None for pair in speed]
    if "multi_adapter" in result:
        checks.append(result["multi_adapter"].get("succeeded") == ADAPTERS)
    if "serve" in result:
        checks.append(result["serve"].get("ok", False))
    return bool(checks) and all(checks) and "error" not in result


def make_model(directory: Path, *, tiny: bool, layers: int | None) -> Path:
    import torch

    from tests.real_phi3 import NARROW, write_random_phi3

    if tiny:
        return write_random_phi3(directory, layers=layers or 2, **NARROW)
    write_random_phi3(directory, layers=layers or 32, dtype=torch.bfloat16, device="cuda")
    torch.cuda.empty_cache()  # the trained and served copies belong to the other processes
    return directory


# ---------------------------------------------------------------------------------------------------------
# speed


def peak_flops(device: str) -> dict[str, Any]:
    """The FLOPs per second MFU is taken against: the card's bf16 dense peak where the device is known, else
    (and on the CPU) large matmuls measured here, in the training dtype."""
    from bench.train import peak_matmul_flops

    measured = float(f"{peak_matmul_flops(device) / 1e12:.4g}")  # TFLOP/s
    if device == "cpu":
        return {"tflops": measured, "source": "fp32 matmuls measured on this CPU"}
    import torch

    torch.cuda.empty_cache()  # the GPU's memory belongs to the sides' processes
    name = torch.cuda.get_device_name()
    peak = {"measured_matmul_tflops": measured}
    card = next((tflops for part, tflops in CARD_PEAK_TFLOPS if part in name), None)
    if card is None:
        return {**peak, "tflops": measured, "source": f"{name}: bf16 matmuls measured"}
    return {**peak, "tflops": card, "source": f"{name}: the card's bf16 dense peak"}


def speed_pair(
    model_dir: Path,
    scratch: Path,
    max_length: int,
    mode: str,
    tiny: bool,
    steps: int | None,
    result: dict,
    budget: Budget,
) -> dict[str, Any]:
    """Both sides of `bench.train` on `model_dir` at `max_length`, each in its own process, killed at the
    deadline: each side's figures and the speedup (or the error that stopped them)."""
    from transformers import AutoConfig

    from bench.train import Setup, prepare, run_child

    config = AutoConfig.from_pretrained(model_dir)
    steps = steps or (TINY_SPEED_STEPS if tiny else SPEED_STEPS)
    shared = Setup(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,  # Phi-3-mini: as many key/value heads (bench.train's FLOPs)
        train_examples=steps * BATCH_SIZE,
        eval_examples=0,  # no eval loss: a few steps on random weights would say nothing of quality
        max_length=max_length,
        batch_size=BATCH_SIZE,
        epochs=1,  # one pass over steps × 4 conversations: exactly `steps` steps on both sides
        learning_rate=SPEED_LEARNING_RATE,
        rounds=1,
        max_reply_words=max_length,
        # Median reply ~27 words × max_length / 256: at 2048 a mean of ~500 tokens, p90 ~1100, the longest
        # truncated; 4 random ones per batch, so the reference pads each batch to its longest.
        reply_scale=max_length / 256,
        quantization=MODES[mode],
    )
    scratch.mkdir()
    pair: dict[str, Any] = {"data": prepare(scratch, shared, model_dir=model_dir), "steps": steps}
    warmup = TINY_WARMUP_STEPS if tiny else WARMUP_STEPS
    peak = result["peak"]["tflops"] * 1e12
    try:
        for side in ("reference", "ours"):  # the reference first, as bench.train's first round
            figures = run_child(side, scratch, timeout=budget.left())
            pair[side] = side_figures(shared, config.vocab_size, figures, warmup, peak)
    except subprocess.TimeoutExpired:
        pair["error"] = "killed at the deadline"
        return pair
    except subprocess.CalledProcessError as error:
        pair["error"] = f"a side failed: {error}"
        return pair
    ours, reference = pair["ours"], pair["reference"]
    pair["speedup"] = round(ours["tokens_per_s"] / reference["tokens_per_s"], 3)
    pair["speedup_with_warmup"] = round(
        ours["tokens_per_s_with_warmup"] / reference["tokens_per_s_with_warmup"], 3
    )
    if ours["peak_gpu_mb"] and reference["peak_gpu_mb"]:
        pair["peak_gpu_memory_ratio"] = round(ours["peak_gpu_mb"] / reference["peak_gpu_mb"], 3)
    return pair


def side_figures(shared: Any, vocab: int, figures: dict, warmup: int, peak: float) -> dict[str, Any]:
    """One side's JSON from `bench.train.run_side`'s figures."""
    from bench.train import model_flops

    ends = figures["step_ends"]
    whole = figures["tokens"] / figures["train_s"]
    rate = whole
    if len(ends) > warmup >= 1:  # from the end of the warm-up's last step to the end of the last step
        (begin, before), (end, after) = ends[warmup - 1], ends[-1]
        rate = (after - before) / (end - begin)
    flops_per_token = model_flops(shared, vocab, figures) / figures["tokens"]
    peak_gpu_mb = figures["peak_gpu_mb"]
    return {
        "tokens_per_s": round(rate, 1),
        "tokens_per_s_with_warmup": round(whole, 1),
        "mfu": round(flops_per_token * rate / peak, 4),
        "peak_gpu_mb": round(peak_gpu_mb) if peak_gpu_mb is not None else None,
        "peak_rss_mb": round(figures["peak_rss_mb"]),
        "train_s": round(figures["train_s"], 2),
        "wall_s": round(figures["wall_s"], 1),
        "steps": figures["steps"],
        "timed_steps": max(0, len(ends) - warmup),
        "tokens": figures["tokens"],
        "train_loss": round(figures["train_loss"], 4),
        "precision": figures["precision"],
        "recompute": figures["recompute"],
    }


# ---------------------------------------------------------------------------------------------------------
# multi_adapter


def multi_adapter(
    model_dir: Path, adapter_dir: Path, root: Path, tiny: bool, budget: Budget
) -> dict[str, Any]:
    """ADAPTERS concurrent requests, one per adapter, through `phitune api` and `phitune inference`."""
    from bench.inference import serving

    archives = adapter_variants(adapter_dir, root, ADAPTERS)
    max_tokens = TINY_MAX_TOKENS if tiny else MAX_TOKENS
    rounds = TINY_ADAPTER_ROUNDS if tiny else ADAPTER_ROUNDS
    env = {"PHITUNE_DEVICE": "cpu" if tiny else "cuda"}
    with serving(root, model_dir, archives, env) as (api_url, key, models):
        measured = asyncio.run(
            measure_adapters(api_url, key, list(models.values()), max_tokens, rounds, budget)
        )
    return {**measured, "requests": ADAPTERS, "adapters": ADAPTERS, "max_tokens": max_tokens}


def adapter_variants(adapter_dir: Path, root: Path, count: int) -> dict[str, Path]:
    """`count` adapters packed as a worker uploads them (`worker.adapter_archive.pack`'s layout): the trained
    one, and copies whose LoRA B matrices are scaled by 1 + i / count. gzip's fastest level: a Phi-3-mini LoRA
    is ~100 MB of incompressible floats."""
    from safetensors.torch import load_file, save_file

    from worker.adapter_archive import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE

    weights = load_file(adapter_dir / PEFT_WEIGHTS_FILE)
    archives = {}
    for index in range(count):
        directory = root / f"adapter{index}"
        directory.mkdir(parents=True)
        shutil.copy(adapter_dir / PEFT_CONFIG_FILE, directory)
        scale = 1 + index / count
        scaled = {name: value * scale if "lora_B" in name else value for name, value in weights.items()}
        save_file(scaled, directory / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        archive = root / f"adapter{index}.tar.gz"
        with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
            for path in sorted(directory.iterdir()):
                tar.add(path, arcname=path.name)
        archives[directory.name] = archive
    return archives


async def measure_adapters(
    api_url: str, key: str, models: list[str], max_tokens: int, rounds: int, budget: Budget
) -> dict[str, Any]:
    """Aggregate completion tokens/s of one request per model, all at once (each adapter loaded first by a
    1-token request, untimed): the median over `rounds`."""
    from bench.inference import chat_caller

    call, load = chat_caller(max_tokens=max_tokens), chat_caller(max_tokens=1)
    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx.Timeout(max(budget.left(), 1.0))
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=timeout) as client:
        for model in models:
            await load(client, model, False)
        rates, succeeded = [], 0
        for _ in range(rounds):
            start = time.perf_counter()
            replies = await asyncio.gather(*(call(client, model, False) for model in models))
            rates.append(sum(replies) / (time.perf_counter() - start))
            succeeded = sum(tokens == max_tokens for tokens in replies)
    return {
        "tokens_per_s": round(statistics.median(rates), 1),
        "tokens_per_s_range": [round(min(rates), 1), round(max(rates), 1)],
        "rounds": rounds,
        "succeeded": succeeded,
    }


# ---------------------------------------------------------------------------------------------------------
# serve


def serve(model_dir: Path, root: Path, tiny: bool, steps: int, budget: Budget) -> dict[str, Any]:
    """The serve section through `phitune serve`; leaves the LoRA job's adapter in root/adapter."""
    result: dict[str, Any] = {"jobs": {}, "greedy_equal": None}
    try:
        with Service(root / "data", model_dir, device="cpu" if tiny else "cuda", budget=budget) as service:
            check(service, model_dir, root, tiny, steps, result, budget)
    except Exception as error:  # what was measured so far still comes out, with the processes' log
        result["error"] = repr(error)
        log = root / "data" / "serve.log"
        result["serve_log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else None
    jobs = result["jobs"]
    trained = "lora" in jobs and all(job["status"] == "succeeded" for job in jobs.values())
    # The greedy comparison and the concurrent requests run unless the deadline came first.
    concurrent = result.get("concurrent") or {"succeeded": CONCURRENT}
    served = result["greedy_equal"] is not False and concurrent["succeeded"] == CONCURRENT
    result["ok"] = trained and served and "error" not in result
    return result


class Service:
    """`phitune serve` on one model, with a fresh data dir and an API key."""

    def __init__(self, data_dir: Path, model_dir: Path, *, device: str, budget: Budget) -> None:
        self.port, self.inference_port = free_port(), free_port()
        self.budget = budget
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "PHITUNE_DATA_DIR": str(data_dir),
            "PHITUNE_BASE_MODELS": json.dumps({MODEL_ID: str(model_dir)}),
            "PHITUNE_DEVICE": device,
            "PHITUNE_INFERENCE_URL": f"http://127.0.0.1:{self.inference_port}",
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def phitune(self, *args: str) -> str:
        return run_phitune(*args, env=self.env)

    def __enter__(self) -> Service:
        Path(self.env["PHITUNE_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
        self.phitune("migrate")
        self.key = self.phitune("keys", "create", "--tenant", "gpu-check").strip().splitlines()[-1]
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=600
        )
        serve = ["serve", "--port", str(self.port), "--inference-port", str(self.inference_port)]
        log = Path(self.env["PHITUNE_DATA_DIR"]) / "serve.log"
        with log.open("w") as output:  # the child keeps a descriptor of its own
            self.process = subprocess.Popen(
                phitune_command(*serve), env=self.env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            for url in (self.url, f"http://127.0.0.1:{self.inference_port}"):
                wait_healthy(url, processes=[self.process], timeout=max(self.budget.left(), 1.0))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        """SIGTERM to serve, which stops its children; SIGKILL to them all if it hangs."""
        self.client.close()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            subprocess.run(["pkill", "-KILL", "-P", str(self.process.pid)], check=False)
            self.process.kill()


def check(
    service: Service, model_dir: Path, root: Path, tiny: bool, steps: int, result: dict, budget: Budget
) -> None:
    """Fill `result` as the checks go, so that a failure keeps what came before it."""
    client = service.client
    upload = client.post(
        "/v1/files", files={"file": ("persona.jsonl", PERSONA.read_bytes())}, data={"purpose": "fine-tune"}
    )
    upload.raise_for_status()
    for name, peft_options in JOBS.items():
        if peft_options and not has_qlora():
            budget.skipped[f"serve job {name}"] = f"{QLORA_PACKAGE} is not installed"
        elif budget.left() < SERVE_STEP_S:
            budget.skipped[f"serve job {name}"] = "the deadline came first"
        else:
            seconds = min(JOB_SECONDS, budget.left())
            result["jobs"][name] = train(client, upload.json()["id"], peft_options, steps, seconds)
    lora = result["jobs"].get("lora")
    if lora is None or lora["status"] != "succeeded":
        return
    if budget.left() < SERVE_STEP_S:
        budget.skipped["serve greedy and concurrent"] = "the deadline came first"
        return
    greedy = {
        "model": lora["fine_tuned_model"],
        "messages": PROMPT,
        "temperature": 0,
        "max_tokens": GREEDY_TOKENS,
    }
    reply = client.post("/v1/chat/completions", json=greedy)
    reply.raise_for_status()
    served = reply.json()["choices"][0]["message"]["content"]
    adapter_dir = download_adapter(client, lora["id"], root / "adapter")
    reference = reference_completion(model_dir, adapter_dir, "cpu" if tiny else "cuda")
    # On random weights the logits are nearly flat: where bf16 kernels round a near-tie apart, say where.
    same = next((i for i, (a, b) in enumerate(zip(served, reference, strict=False)) if a != b), None)
    result.update(greedy_equal=served == reference, served_text=served, reference_text=reference)
    if served != reference:
        result["greedy_first_difference_at_char"] = (
            same if same is not None else min(len(served), len(reference))
        )
    result["concurrent"] = asyncio.run(concurrent_requests(service, lora["fine_tuned_model"]))
    token = Settings(data_dir=Path(service.env["PHITUNE_DATA_DIR"])).resolved_inference_token
    stats = (
        httpx.get(f"http://127.0.0.1:{service.inference_port}/stats", headers=bearer(token), timeout=30)
        .raise_for_status()
        .json()
    )
    result["inference_memory"] = stats.get("models", {}).get(MODEL_ID, {}).get("memory")


def train(client: httpx.Client, file_id: str, peft_options: dict, steps: int, seconds: float) -> dict:
    """Run one job to its end (cancelled after `seconds`): its status, error, seconds, events' figures."""
    started = time.monotonic()
    body = {
        "model": MODEL_ID,
        "training_file": file_id,
        "training_config": {
            "max_steps": steps, "per_device_train_batch_size": 4, "max_seq_length": 512, "logging_steps": 5,
            "learning_rate": 2e-4,
        },
        "peft_config": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", **peft_options},
    }  # fmt: skip
    created = client.post("/v1/fine_tuning/jobs", json=body)
    created.raise_for_status()
    job = created.json()
    while job["status"] in ("queued", "running"):
        if time.monotonic() - started > seconds:
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        time.sleep(2)
        job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    events = client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100, "order": "asc"}
    ).json()["data"]
    messages = [event["message"] for event in events]
    losses = [event["data"]["train_loss"] for event in events if event["type"] == "metrics"]
    return {
        "id": job["id"],
        "status": job["status"],
        "error": job["error"],
        "fine_tuned_model": job["fine_tuned_model"],
        "seconds": round(time.monotonic() - started, 1),
        "device_event": next((text for text in messages if text.startswith("Device ")), None),
        "estimated_memory": next((text for text in messages if text.startswith("Estimated memory ")), None),
        "peak_memory": next(
            (e["data"] for e in events if (e.get("data") or {}).get("peak_memory_bytes")), None
        ),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def download_adapter(client: httpx.Client, job_id: str, directory: Path) -> Path:
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    response.raise_for_status()
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(directory, filter="data")
    return directory


def reference_completion(model_dir: Path, adapter_dir: Path, device: str) -> str:
    """Greedy decoding in this process: the base model loaded as the server loads it, PEFT's adapter."""
    import torch
    from peft import PeftModel

    from worker.model_loader import load_base_model

    base, tokenizer = load_base_model(str(model_dir), for_training=False, device=device)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(ids.to(base.device), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    del model, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return text


async def concurrent_requests(service: Service, model: str) -> dict:
    """CONCURRENT completions at once, each of exactly CONCURRENT_TOKENS tokens."""
    headers = {"Authorization": f"Bearer {service.key}"}
    body = {"model": model, "messages": PROMPT, "max_tokens": CONCURRENT_TOKENS, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=600) as client:
        started = time.monotonic()
        replies = await asyncio.gather(
            *[client.post("/v1/chat/completions", json=body) for _ in range(CONCURRENT)]
        )
        seconds = time.monotonic() - started
    tokens = sum(reply.json()["usage"]["completion_tokens"] for reply in replies if reply.status_code == 200)
    failed = next((reply for reply in replies if reply.status_code != 200), None)
    return {
        "requests": CONCURRENT,
        "succeeded": sum(reply.status_code == 200 for reply in replies),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        **({"first_failure": f"{failed.status_code} {failed.text[:300]}"} if failed else {}),
    }


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what this process and its children write to stdout to stderr: stdout is the JSON line's."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="rehearse on the CPU with a narrow model")
    parser.add_argument(
        "--only", choices=("speed", "serve"), help="one part: speed, or serve + multi_adapter"
    )
    parser.add_argument("--layers", type=int, default=None, help="layers of the model (default 32; tiny 2)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each serve job")
    parser.add_argument(
        "--speed-steps", type=int, default=None, help=f"steps of each speed side ({SPEED_STEPS})"
    )
    parser.add_argument("--lengths", type=str, default=None, help="speed max lengths, e.g. 2048,4096")
    parser.add_argument("--modes", type=str, default=None, help=f"speed modes, of {','.join(MODES)}")
    parser.add_argument("--deadline", type=float, default=None, help=f"seconds in all (default {DEADLINE_S})")
    options = parser.parse_args(argv)
    modes = tuple(options.modes.split(",")) if options.modes else None
    if modes and (unknown := set(modes) - set(MODES)):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(
        tiny=options.tiny,
        layers=options.layers,
        steps=options.steps,
        only=options.only,
        speed_steps=options.speed_steps,
        lengths=tuple(int(n) for n in options.lengths.split(",")) if options.lengths else None,
        modes=modes,
        deadline=options.deadline,
    )
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
