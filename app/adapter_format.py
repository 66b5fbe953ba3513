"""The adapter download formats and the response header that names one.

Shared by the API, which stores and serves the archives, and the worker, which packs and reads them
(`worker.adapter_archive`). It lives on the API side because the API must install without torch or the worker.
"""

from __future__ import annotations

from typing import Literal

Format = Literal["peft", "loralib"]
FORMATS: tuple[Format, ...] = ("peft", "loralib")
FORMAT_HEADER = "X-Phitune-Adapter-Format"  # on the internal adapter download: the format of the archive sent
# A PEFT archive's files at its root, as PEFT (and vLLM) read them.
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
