"""The export task: fold a job's adapter into its base model and send the API the merged model, a standard
Hugging Face directory (sharded safetensors in the base model's dtype, config, generation config, tokenizer
with its chat template) as a plain tar.

A PEFT adapter is merged by PEFT (`merge_and_unload`); a loralib adapter by loralib, whose layers fold their
update into the weight when they leave training mode. Either way the base is loaded unquantised, in the
dtype its files hold, on the CPU: a QLoRA adapter merges into the full-precision base it was trained over.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from app.adapter_format import Format
from app.config import Settings
from app.internal.contracts import ExportClaimReply
from worker.adapter_archive import (
    LORALIB_CONFIG_FILE,
    LORALIB_STATE_DICT_FILE,
    extract_adapter,
    served_format,
)
from worker.client import ApiUnreachable, ClaimRefused, ExportClient, LeaseLost
from worker.tasks import resolve_base_model

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
_HASH_CHUNK_BYTES = 1 << 20


def merge(base_model: str, adapter_dir: Path, fmt: Format, output_dir: Path, *, max_shard_size: str) -> Path:
    """Write `base_model` with the adapter in `adapter_dir` merged into its weights to `output_dir`, as
    `AutoModelForCausalLM.from_pretrained` loads it."""
    from transformers import AutoModelForCausalLM

    from worker.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    if fmt == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    else:
        merge_loralib(model, adapter_dir)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    load_tokenizer(base_model).save_pretrained(output_dir)  # with the chat template
    return output_dir


def merge_loralib(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Fold a loralib adapter (`worker.loralib_backend`) into `model`'s weights, in place, leaving plain
    `nn.Linear` layers: loralib's own merge, B·A·alpha/r added to each weight as the layer leaves training."""
    from safetensors.torch import load_file
    from torch import nn

    from worker.loralib_backend import LoralibConfig, add_lora_layers

    config = LoralibConfig.from_json((adapter_dir / LORALIB_CONFIG_FILE).read_text(encoding="utf-8"))
    names = add_lora_layers(model, config, merge_weights=True)
    missing, unexpected = model.load_state_dict(
        load_file(adapter_dir / LORALIB_STATE_DICT_FILE), strict=False
    )
    if unset := [name for name in missing if "lora_" in name]:
        raise ValueError(f"the loralib adapter lacks {len(unset)} LoRA weights of the model, e.g. {unset[0]}")
    if unexpected:
        raise ValueError(f"the loralib adapter holds weights the model lacks, e.g. {unexpected[0]}")
    for name in names:
        layer: Any = model.get_submodule(name)  # a loralib layer: a Linear with lora_A and lora_B
        layer.train(False)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        model.set_submodule(name, plain)
    return model


def pack(directory: Path, archive: Path) -> str:
    """A plain tar of the directory's files at its root (safetensors barely compress); returns its
    sha256."""
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    digest = hashlib.sha256()
    with archive.open("rb") as packed:
        while chunk := packed.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class Heartbeat:
    """Renews the export's lease from a thread while the block runs."""

    def __init__(self, attempt: ExportClient, seconds: float) -> None:
        self._attempt = attempt
        self._seconds = seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="export-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self._seconds):
            try:
                self._attempt.heartbeat()
            except httpx.HTTPStatusError as exc:  # superseded or over: the upload will be refused too
                log.warning("export heartbeat refused: %s", exc.response.text)
                return
            except Exception as exc:  # the lease must outlive any one bad reply
                log.warning("export heartbeat failed: %s", exc)


def make(claim: ExportClaimReply, attempt: ExportClient, settings: Settings, scratch: Path) -> None:
    """Fetch the adapter, merge it, pack the directory and upload it."""
    archive = scratch / "adapter.tar.gz"
    fmt = served_format(attempt.download_adapter(archive))
    adapter_dir = extract_adapter(archive, scratch / "adapter", fmt)
    merged = merge(
        resolve_base_model(settings, claim.model),
        adapter_dir,
        fmt,
        scratch / "merged",
        max_shard_size=settings.export_max_shard_size,
    )
    tar = scratch / "merged.tar"
    attempt.upload(tar, pack(merged, tar))


def run_export(export_id: str, settings: Settings) -> str:
    """The Celery task's body. Any exception becomes a failed export with a readable message."""
    attempt = ExportClient(settings.api_url, settings.resolved_worker_token)
    try:
        try:
            claim = attempt.claim(export_id)
        except ClaimRefused as refusal:
            log.info("skipping export %s: %s", export_id, refusal)
            return "skipped"
        except ApiUnreachable as down:  # the export's next read sends its message again
            log.warning("could not claim export %s: %s", export_id, down)
            return "unreachable"
        work_dir = settings.data_dir / "work"
        work_dir.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix=f"{export_id}-", dir=work_dir) as scratch,
            Heartbeat(attempt, claim.heartbeat_seconds),
        ):
            try:
                make(claim, attempt, settings, Path(scratch))
            except LeaseLost as lost:  # nothing to report to: the API retries the export when it is back
                log.warning("export %s abandoned: %s", export_id, lost)
                return "lost"
            except Exception as exc:
                log.exception("export %s failed", export_id)
                _report_failure(attempt, f"{type(exc).__name__}: {exc}")
                return "failed"
        return "done"
    finally:
        attempt.close()


def _report_failure(attempt: ExportClient, message: str) -> None:
    try:
        attempt.fail(message)
    except httpx.HTTPError as exc:  # superseded or already over: the API keeps the newer truth
        log.warning("could not report the export's failure: %s", exc)
