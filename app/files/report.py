"""A dataset's report: how many examples, how many tokens each with the base model's tokenizer, what the job
would train on and what `max_seq_length` would cut, duplicates and empty replies; computed on first request
and kept in storage, keyed by what it depends on (the file's content, the base model, the max length and
whether inputs are trained on), so that asking again reads a small JSON blob.

The tokens are counted as the worker trains (`app.chat_tokens`, the one definition both use), with the
tokenizer read torch-free (`app.base_tokenizer`). A base model whose tokenizer cannot be read that way gets a
report without token counts, saying why (`tokens_unavailable`).

The file is read a line at a time: a report of a huge file holds one integer per example (its length, for
the statistics and for the dry run's packing) and one 16-byte digest per distinct example, never the file.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.base_tokenizer import BaseTokenizer, TokenizerUnavailable, load_base_tokenizer
from app.chat_tokens import tokenize_example
from app.config import Settings
from app.dataset_format import ChatRecord, PromptCompletionRecord, TextRecord, load_line, parse_record
from app.errors import ModelNotAvailable, RateLimited
from app.models import File
from app.storage import Storage

REPORT_VERSION = 2  # part of the cache key: a change to what a report holds computes every report anew
HISTOGRAM_BINS = 10
MAX_CONCURRENT_REPORTS = 2
_COMPUTING = threading.BoundedSemaphore(MAX_CONCURRENT_REPORTS)


@dataclass(frozen=True)
class ReportKey:
    """What a report depends on besides the file's content."""

    model: str
    model_dir: str
    max_seq_length: int
    train_on_inputs: bool = False

    def storage_key(self, file_id: str) -> str:
        """Per file, not per content: whether another tenant's identical file was reported before must not
        show in how fast a first report answers."""
        spec = json.dumps(
            [REPORT_VERSION, self.model, self.model_dir, self.max_seq_length, self.train_on_inputs]
        )
        return f"reports/{file_id}/{hashlib.sha256(spec.encode()).hexdigest()[:32]}.json"


@dataclass
class Computed:
    """A report as stored: the figures the API answers with, and the truncated lengths of the examples a job
    keeps (in file order), for the dry run's steps."""

    report: dict[str, Any]
    kept_lengths: list[int] = field(default_factory=list)


def report_key(
    settings: Settings, model: str | None, max_seq_length: int, train_on_inputs: bool
) -> ReportKey:
    """The key of a report for base model `model` (default: the first configured); a 400 naming `model`
    when it is not configured."""
    models = settings.resolved_base_models
    name = model or next(iter(models))
    if name not in models:
        raise ModelNotAvailable(
            f"Model '{name}' is not a base model of this server; available: {', '.join(sorted(models))}",
            param="model",
        )
    return ReportKey(name, models[name], max_seq_length, train_on_inputs)


def dataset_report(storage: Storage, row: File, key: ReportKey) -> Computed:
    """The report of dataset `row`, from storage when computed before; one without token counts is not
    kept."""
    cache_key = key.storage_key(row.id)
    if storage.exists(cache_key):
        stored = json.loads(b"".join(_chunks(storage, cache_key)))
        return Computed(stored["report"], stored["kept_lengths"])
    # A report of a large file takes a core and memory for a while: a few at a time per API process.
    if not _COMPUTING.acquire(blocking=False):
        raise RateLimited(
            f"{MAX_CONCURRENT_REPORTS} dataset reports are being computed on this server; try again shortly",
            retry_after=5,
        )
    try:
        computed = compute_report(_lines(storage, row.storage_key), key)
    finally:
        _COMPUTING.release()
    if computed.report["tokens_unavailable"] is None:  # a tokenizer mounted later must be used then
        temp = storage.temp_path()
        try:
            temp.write_text(json.dumps({"report": computed.report, "kept_lengths": computed.kept_lengths}))
            storage.commit(temp, cache_key)
        finally:
            temp.unlink(missing_ok=True)
    return computed


def compute_report(lines: Iterator[bytes], key: ReportKey) -> Computed:
    """The report of a valid dataset's lines."""
    try:
        tokenizer: BaseTokenizer | None = load_base_tokenizer(key.model_dir)
        unavailable = None
    except TokenizerUnavailable as reason:
        tokenizer, unavailable = None, str(reason)
    examples = duplicates = empty_turns = 0
    seen: set[bytes] = set()
    lengths, kept = array("q"), array("q")
    trained = truncated_examples = truncated_tokens = dropped = 0
    for number, line in enumerate(lines, start=1):
        obj = load_line(line, first=number == 1)
        if obj is None:
            continue
        examples += 1
        digest = hashlib.blake2b(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
        duplicates += digest in seen
        seen.add(digest)
        record = parse_record(obj)
        if isinstance(record, ChatRecord):
            empty_turns += sum(m.role == "assistant" and not m.content.strip() for m in record.messages)
        if tokenizer is None:
            continue
        if not isinstance(record, ChatRecord | PromptCompletionRecord | TextRecord):
            tokenizer, unavailable = None, f"tokens are counted for supervised datasets, not {record.format}"
            continue
        try:
            ids, mask = tokenize_example(record, tokenizer, train_on_inputs=key.train_on_inputs)
        except (
            Exception
        ) as error:  # the template's own raise_exception, or a reply it does not render verbatim
            tokenizer, unavailable = None, f"line {number}: the chat template cannot render it: {error}"
            continue
        lengths.append(len(ids))
        if len(ids) > key.max_seq_length:
            truncated_examples += 1
            truncated_tokens += len(ids) - key.max_seq_length
        example_trained = sum(mask[: key.max_seq_length])
        if example_trained:
            trained += example_trained
            kept.append(min(len(ids), key.max_seq_length))
        else:
            dropped += 1
    report: dict[str, Any] = {
        "model": key.model,
        "max_seq_length": key.max_seq_length,
        "train_on_inputs": key.train_on_inputs,
        "examples": examples,
        "duplicate_examples": duplicates,
        "empty_assistant_turns": empty_turns,
        "tokens": None,
        "trained_tokens": None,
        "truncated_examples": None,
        "truncated_tokens": None,
        "dropped_examples": None,
        "tokens_unavailable": unavailable,
    }
    if tokenizer is None or not lengths:
        return Computed(report)
    report |= {
        "tokens": token_statistics(lengths),
        "trained_tokens": trained,
        "truncated_examples": truncated_examples,
        "truncated_tokens": truncated_tokens,
        "dropped_examples": dropped,
    }
    return Computed(report, kept.tolist())


def token_statistics(lengths: array) -> dict[str, Any]:
    """Tokens per example: total, min, median, 95th percentile (nearest rank), max and a histogram of at most
    HISTOGRAM_BINS equal bins from the shortest to the longest (each from `start` to `end`, exclusive)."""
    ordered = sorted(lengths)
    shortest, longest = ordered[0], ordered[-1]
    width = -(-(longest - shortest + 1) // HISTOGRAM_BINS)
    counts = [0] * ((longest - shortest) // width + 1)
    for length in ordered:
        counts[(length - shortest) // width] += 1
    return {
        "total": sum(ordered),
        "min": shortest,
        "median": statistics.median(ordered),
        "p95": ordered[-(-95 * len(ordered) // 100) - 1],
        "max": longest,
        "histogram": [
            {"start": shortest + index * width, "end": shortest + (index + 1) * width, "count": count}
            for index, count in enumerate(counts)
        ],
    }


def _lines(storage: Storage, key: str) -> Iterator[bytes]:
    """The blob's lines, read a chunk at a time."""
    rest = b""
    for chunk in _chunks(storage, key):
        *complete, rest = (rest + chunk).split(b"\n")
        yield from complete
    if rest:
        yield rest


def _chunks(storage: Storage, key: str) -> Iterator[bytes]:
    return storage.read(key, 0, storage.size(key))
