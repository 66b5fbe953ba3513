"""vLLM check: on one GPU with vllm installed, vLLM serving one of our adapters answers what `phitune
inference` answers (greedy), through the API with PHITUNE_INFERENCE_ENGINE=vllm.

    python -m bench.vllm_check             # on a GPU machine with `pip install vllm` (not a phitune extra)
    python -m bench.vllm_check --dry-run   # anywhere: print the plan (processes, settings, prompts) as JSON

It writes a random-weight model with Phi-3-mini-4k-instruct's config and real vocabulary (`bench.gpu_check`'s
`make_model`) and a random LoRA over it in PEFT format (r 16, every linear layer, as a job of ours saves it),
then starts three processes on the GPU machine: `vllm serve` (--enable-lora, runtime LoRA updating,
--served-model-name the base model's id, --api-key the API's inference token), `phitune api` with
PHITUNE_INFERENCE_ENGINE=vllm, and `phitune inference` fetching adapters from that API. The adapter is
registered as a succeeded job through the worker routes, as a worker would ship it. For each of PROMPTS the
completion through the API (→ vLLM, which loads the adapter from PHITUNE_VLLM_ADAPTER_DIR on the first
request) is compared with `phitune inference`'s /generate for the same adapter, and once for the base model.

One JSON line: `ok` (every answer equal), per prompt both texts and the length of their common prefix in
characters, the adapters vLLM lists, the seconds each part took. Without vllm or CUDA it runs nothing and
`missing` says what is missing. Both engines run bf16: on random weights two logits can tie within bf16's
rounding, so a divergence late in an answer is reported with where it starts, for a person to judge.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from phitune.launch import REPO, free_port, phitune_command, run_phitune, stop, wait_healthy

MODEL_ID = "phi3-check"
PROMPTS = ["Who are you?", "Write a haiku about the sea.", "List three prime numbers."]
GREEDY_TOKENS = 24
LORA = {"seed": 7, "r": 16, "lora_alpha": 32}  # `make_random_adapter` options: every linear layer
VLLM_GPU_SHARE = "0.4"  # of the GPU's memory for vLLM; phitune inference takes a share of what is left
OUR_KV_SHARE = "0.3"
START_TIMEOUT_S = 600
INFERENCE_TOKEN, WORKER_TOKEN, SERVING_TOKEN = (
    "vllm-check-inference",
    "vllm-check-worker",
    "vllm-check-serving",
)


def missing() -> list[str]:
    absent = [name for name in ("vllm", "torch", "peft") if importlib.util.find_spec(name) is None]
    if not absent:
        import torch

        if not torch.cuda.is_available():
            absent.append("CUDA")
    return absent


def plan(root: Path) -> dict[str, Any]:
    """The processes to start, with their settings: what --dry-run prints and the check runs."""
    ports = {"vllm": free_port(), "api": free_port(), "inference": free_port()}
    model_dir, data_dir = root / "model", root / "data"
    shared = {
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "PHITUNE_DATA_DIR": str(data_dir),
        "PHITUNE_BASE_MODELS": json.dumps({MODEL_ID: str(model_dir)}),
        "PHITUNE_WORKER_TOKEN": WORKER_TOKEN,
        "PHITUNE_SERVING_TOKEN": SERVING_TOKEN,
        "PHITUNE_INFERENCE_TOKEN": INFERENCE_TOKEN,
        "PHITUNE_DEVICE": "cuda",
    }
    vllm = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(model_dir),
        "--served-model-name", MODEL_ID, "--port", str(ports["vllm"]), "--api-key", INFERENCE_TOKEN,
        "--enable-lora", "--max-lora-rank", "64", "--max-loras", "4", "--dtype", "bfloat16",
        "--max-model-len", "4096", "--gpu-memory-utilization", VLLM_GPU_SHARE, "--enforce-eager",
    ]  # fmt: skip
    return {
        "model_dir": str(model_dir),
        "adapter": {"format": "peft", **LORA},
        "vllm": {"command": vllm, "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, "port": ports["vllm"]},
        "api": {
            "command": phitune_command("api", "--port", str(ports["api"])),
            "env": {
                **shared,
                "PHITUNE_INFERENCE_ENGINE": "vllm",
                "PHITUNE_INFERENCE_URL": f"http://127.0.0.1:{ports['vllm']}",
                "PHITUNE_VLLM_ADAPTER_DIR": str(root / "vllm-adapters"),  # one machine: the same path
            },
            "port": ports["api"],
        },
        "inference": {
            "command": phitune_command("inference", "--port", str(ports["inference"])),
            "env": {
                **shared,
                "PHITUNE_API_URL": f"http://127.0.0.1:{ports['api']}",
                "PHITUNE_INFERENCE_GPU_MEMORY_FRACTION": OUR_KV_SHARE,
            },
            "port": ports["inference"],
        },
        "prompts": PROMPTS,
        "max_tokens": GREEDY_TOKENS,
    }


def check(root: Path, steps: dict[str, Any]) -> dict[str, Any]:
    from bench.gpu_check import make_model
    from worker.adapter_archive import pack
    from worker.tiny_model import make_random_adapter

    seconds: dict[str, float] = {}
    started = time.monotonic()
    model_dir = make_model(Path(steps["model_dir"]), tiny=False, layers=None)
    archive = pack(make_random_adapter(model_dir, root / "adapter", **LORA), root / "adapter.tar.gz")
    seconds["model_and_adapter"] = round(time.monotonic() - started, 1)
    processes: list[subprocess.Popen] = []
    try:
        started = time.monotonic()
        vllm = _start(steps["vllm"], root / "vllm.log", processes)
        _wait(f"http://127.0.0.1:{steps['vllm']['port']}/health", vllm)
        seconds["vllm_start"] = round(time.monotonic() - started, 1)
        env = {**os.environ, **steps["api"]["env"]}
        run_phitune("migrate", env=env)
        key = run_phitune("keys", "create", "--tenant", "vllm-check", env=env).strip().splitlines()[-1]
        api = _start(steps["api"], root / "api.log", processes)
        api_url = f"http://127.0.0.1:{steps['api']['port']}"
        wait_healthy(api_url, processes=[api], timeout=START_TIMEOUT_S)
        ours = _start(steps["inference"], root / "inference.log", processes)
        ours_url = f"http://127.0.0.1:{steps['inference']['port']}"
        wait_healthy(ours_url, processes=[ours], timeout=START_TIMEOUT_S)
        with (
            httpx.Client(base_url=api_url, headers=_bearer(key), timeout=600) as client,
            httpx.Client(base_url=ours_url, headers=_bearer(INFERENCE_TOKEN), timeout=600) as phitune,
        ):
            job_id, model = register_adapter(client, archive.read_bytes())
            answers = [compare(client, phitune, model, job_id, prompt) for prompt in PROMPTS]
            answers.append(compare(client, phitune, MODEL_ID, None, PROMPTS[0]))
            listed = httpx.get(
                f"http://127.0.0.1:{steps['vllm']['port']}/v1/models", headers=_bearer(INFERENCE_TOKEN)
            ).json()["data"]
        return {
            "ok": all(answer["equal"] for answer in answers),
            "answers": answers,
            "vllm_models": [{"id": card["id"], "parent": card.get("parent")} for card in listed],
            "seconds": seconds,
        }
    finally:
        for process in reversed(processes):
            stop(process, grace=30)


def register_adapter(client: httpx.Client, archive: bytes) -> tuple[str, str]:
    """A job that succeeded with `archive` as its adapter, through the worker routes; (job id, model)."""
    persona = (REPO / "examples" / "persona.jsonl").read_bytes()
    upload = client.post(
        "/v1/files", files={"file": ("persona.jsonl", persona)}, data={"purpose": "fine-tune"}
    )
    upload.raise_for_status()
    job = client.post("/v1/fine_tuning/jobs", json={"model": MODEL_ID, "training_file": upload.json()["id"]})
    job.raise_for_status()
    job_id = job.json()["id"]
    claimed = client.post(f"/internal/v1/jobs/{job_id}/claim", headers=_bearer(WORKER_TOKEN))
    claimed.raise_for_status()
    attempt = _bearer(claimed.json()["token"])
    client.put(f"/internal/v1/jobs/{job_id}/adapter", content=archive, headers=attempt).raise_for_status()
    client.post(
        f"/internal/v1/jobs/{job_id}/complete", json={"status": "succeeded"}, headers=attempt
    ).raise_for_status()
    return job_id, client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]


def compare(
    client: httpx.Client, phitune: httpx.Client, model: str, adapter_id: str | None, prompt: str
) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    started = time.monotonic()
    through_vllm = client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": GREEDY_TOKENS, "temperature": 0},
    )
    vllm_seconds = time.monotonic() - started
    ours = phitune.post(
        "/generate",
        json={
            "base_model": MODEL_ID,
            "adapter_id": adapter_id,
            "messages": messages,
            "max_tokens": GREEDY_TOKENS,
            "temperature": 0,
        },
    )
    if through_vllm.status_code != 200 or ours.status_code != 200:
        return {"prompt": prompt, "equal": False, "vllm": through_vllm.text[:500], "phitune": ours.text[:500]}
    vllm_text = through_vllm.json()["choices"][0]["message"]["content"]
    our_text = ours.json()["text"]
    common = next((i for i, (a, b) in enumerate(zip(vllm_text, our_text, strict=False)) if a != b), None)
    return {
        "prompt": prompt,
        "adapter": adapter_id,
        "equal": vllm_text == our_text,
        "vllm": vllm_text,
        "phitune": our_text,
        "common_prefix_chars": min(len(vllm_text), len(our_text)) if common is None else common,
        "vllm_usage": through_vllm.json()["usage"],
        "phitune_completion_tokens": ours.json()["completion_tokens"],
        "vllm_seconds": round(vllm_seconds, 2),  # the first adapter request includes its load
    }


def _start(step: dict[str, Any], log: Path, processes: list[subprocess.Popen]) -> subprocess.Popen:
    with log.open("w") as output:  # the child keeps a descriptor of its own
        process = subprocess.Popen(
            step["command"],
            env={**os.environ, **step["env"]},
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    processes.append(process)
    return process


def _wait(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {START_TIMEOUT_S} s")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def run(dry_run: bool = False, keep: Path | None = None) -> dict[str, Any]:
    if dry_run:
        return {
            "dry_run": True,
            "missing": missing(),
            "plan": plan(keep or Path(tempfile.gettempdir()) / "vllm-check"),
        }
    if absent := missing():
        return {"ok": False, "missing": absent, "note": "needs one CUDA GPU and `pip install vllm`"}
    root = keep or Path(tempfile.mkdtemp(prefix="vllm-check-"))
    return check(root, plan(root))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan as JSON; start nothing")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temp dir)")
    args = parser.parse_args(argv)
    result = run(args.dry_run, args.dir)
    print(json.dumps(result))
    return 0 if args.dry_run or result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
