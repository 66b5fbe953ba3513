"""`python -m bench NAME`: run the named benchmark and print its result as one JSON line."""

from __future__ import annotations

import json
import os
import sys

BENCHMARKS = {
    "inference": "bench.inference",
    "followers": "bench.followers",
    "loralib_step": "bench.loralib_step",
    "gpu_check": "bench.gpu_check",
    "engine_memory": "bench.engine_memory",
    "train": "bench.train",
    "service": "bench.service",
    "upload": "bench.upload",
    "api": "bench.api",
    "serving_cache": "bench.serving_cache",
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in BENCHMARKS:
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)}}}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the benchmark imports huggingface_hub
    from importlib import import_module

    result = import_module(BENCHMARKS[argv[0]]).run()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
