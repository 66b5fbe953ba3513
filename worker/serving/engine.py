"""Continuous batching: one scheduler thread owns the model and runs every admitted sequence together.

Each iteration of the scheduler
1. runs the commands other threads queued (adapter insertions and removals: they only touch the model here,
   between two forward passes),
2. drops the sequences whose client went away, giving their KV cache blocks back,
3. admits waiting requests, first come first served, while fewer than max_batch_size sequences run and the
   KV cache has room for the prompt and all max_tokens of the next one (reserved up front, so that an
   admitted sequence never runs out of cache),
4. prefills one chunk of at most `prefill_chunk_tokens` prompt tokens, padding included, from the oldest
   admitted prompts; a sequence whose prompt is all in the cache samples its first token and starts decoding,
5. runs one decode step for all decoding sequences, whatever their adapters (see `worker.serving.lora`),
6. hands each sequence its text and, when it ended, its finish reason; finished rows leave the batch.

A long prompt thus takes one chunk per iteration, and the decoding rows advance one token between two chunks
instead of stalling for the whole prefill. Each forward pass ends with one device-to-host copy, its sampled
tokens (`worker.serving.sampling`). Decoding rows are kept sorted by adapter slot, which is how `MultiLora`
groups them. The KV cache is one pool allocated when the engine is made (`worker.serving.kv_cache`): a row
that joins or leaves moves no keys or values; only the decoding rows' slot table is rebuilt.

When the engine is idle it waits a few milliseconds after the first arrival, so that requests sent together
share their first forward pass.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker.serving.batch import CacheRow, RowBatch
from worker.serving.kv_cache import CUDA_MEMORY_FRACTION, KvPool, default_budget
from worker.serving.lora import BASE_SLOT, AdapterWeights, MultiLora
from worker.serving.sampling import Sampler, next_tokens
from worker.serving.text import CompletionText
from worker.serving.transfer import to_device

DEFAULT_PREFILL_CHUNK_TOKENS = 512

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter_slot: int = BASE_SLOT
    ignore_eos: bool = False  # generate past end-of-sequence tokens, for benchmarks that need fixed lengths


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # every generated token, the end-of-sequence token included


@dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | Finished | Failed
EventSink = Callable[[Event], None]  # called on the scheduler thread; must not block


class ContextLengthExceeded(ValueError):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Generation:
    """One submitted request, as the scheduler tracks it."""

    def __init__(
        self, request: GenerationRequest, sink: EventSink, sampler: Sampler, text: CompletionText
    ) -> None:
        self.request = request
        self.sampler = sampler
        self.completion_tokens = 0
        self.row: CacheRow | None = None  # its KV cache blocks, from admission to its end
        self.last_token = 0  # the last token sampled: the next decode step's input
        self.cancelled = False
        self.finished = False  # its Finished or Failed event went out
        self._sink = sink
        self._text = text

    @property
    def cache_tokens(self) -> int:
        """The tokens whose keys and values it stores at most: the prompt and every completion token but
        the last, which is never fed back."""
        return len(self.request.prompt_ids) + self.request.max_tokens - 1

    @property
    def admitted_row(self) -> CacheRow:
        """Its KV cache blocks; only an admitted sequence that has not ended has them."""
        if self.row is None:
            raise RuntimeError("the sequence holds no KV cache blocks")
        return self.row

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not in the cache yet."""
        return len(self.request.prompt_ids) - self.admitted_row.length

    def cancel(self) -> None:
        """Stop generating: the sequence leaves the batch at the next step. Safe from any thread."""
        self.cancelled = True

    def accept(self, token: int, eos_token_ids: frozenset[int]) -> bool:
        """Take the token sampled for this sequence and emit its text; False once the sequence ended."""
        self.completion_tokens += 1
        reason = None
        if token in eos_token_ids and not self.request.ignore_eos:
            text, reason = self._text.finish(), "stop"
        else:
            text = self._text.push(token)
            if self._text.stopped:
                reason = "stop"
            elif self.completion_tokens >= self.request.max_tokens:
                text += self._text.finish()
                reason = "stop" if self._text.stopped else "length"
        if text:
            self.emit(TextDelta(text))
        if reason:
            self.emit(Finished(reason, len(self.request.prompt_ids), self.completion_tokens))
        return reason is None

    def emit(self, event: Event) -> None:
        """Hand an event to the consumer; nothing follows a Finished or Failed event."""
        if self.finished:
            return
        self.finished = not isinstance(event, TextDelta)
        try:
            self._sink(event)
        except Exception:  # the consumer is gone (e.g. its event loop closed): nobody wants the rest
            log.exception("dropping a generation whose consumer failed")
            self.cancelled = True


class Engine:
    """Batched generation over one base model and its loaded LoRA adapters.

    `max_batch_tokens` is the KV cache budget, in tokens: the pool allocated up front and what admission
    reserves against (by default `kv_cache.default_budget`). A budget under the model's context shortens the
    context the engine accepts (`context_length`). `prefill_chunk_tokens` bounds a prefill forward pass."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 32,
        batch_window_seconds: float = 0.002,
        max_batch_tokens: int | None = None,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        gpu_memory_fraction: float = CUDA_MEMORY_FRACTION,
    ) -> None:
        self.model = model
        if model.config._attn_implementation != "sdpa":
            # The engine passes its own boolean 4D masks: SDPA takes them, FlashAttention-2 takes none.
            model.set_attn_implementation("sdpa")
        self.tokenizer = tokenizer  # for callers, to encode prompts
        # The scheduler decodes with a copy of its own: a fast tokenizer used by two threads at once can fail
        # with "Already borrowed".
        self._decoding_tokenizer = copy.deepcopy(tokenizer)
        config, device = model.config, model.device
        budget = max_batch_tokens or default_budget(
            config, model.dtype, device, max_batch_size, gpu_memory_fraction
        )
        self.kv_pool = KvPool(config, tokens=budget, dtype=model.dtype, device=device)  # read-only outside
        self.context_length: int = min(config.max_position_embeddings, self.kv_pool.capacity)
        self.lora = MultiLora(model)
        self._max_batch_size = max_batch_size
        self._batch_window_seconds = batch_window_seconds
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._sliding_window: int | None = getattr(config, "sliding_window", None)
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self._eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        self._wakeup = threading.Condition()
        self._commands: list[Callable[[], None]] = []  # run on the scheduler thread between steps
        self._waiting: deque[Generation] = deque()
        self._prefilling: list[Generation] = []  # admitted, prompt not all in the cache yet; oldest first
        self._decoding: list[Generation] = []  # sorted by adapter slot
        self._decode_batch: RowBatch | None = None  # the decoding rows' slot table, until they change
        self._free_slots: list[int] = []
        self._next_slot = BASE_SLOT + 1
        self._stopping = False
        self._counters = {
            "prefills": 0,  # prefill forward passes (chunks)
            "prefill_tokens": 0,
            "decode_steps": 0,
            "decoded_tokens": 0,
            "cancelled_sequences": 0,
        }
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the scheduler; sequences still waiting or running get a Failed event."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthExceeded unless the prompt and max_tokens new tokens fit the context."""
        if prompt_tokens >= self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens, and the messages "
                f"take {prompt_tokens}, which leaves no room for a completion. Shorten the messages.",
                param="messages",
            )
        if prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Lower max_tokens to at most "
                f"{self.context_length - prompt_tokens}.",
                param="max_tokens",
            )

    def submit(self, request: GenerationRequest, sink: EventSink) -> Generation:
        """Queue a request; `sink` receives its TextDelta events, then one Finished or Failed event."""
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        self.check_length(len(request.prompt_ids), request.max_tokens)  # so it fits the KV cache too
        sampler = Sampler(request.temperature, request.top_p, request.seed)
        generation = Generation(
            request, sink, sampler, CompletionText(self._decoding_tokenizer, request.stop)
        )
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._waiting.append(generation)
            self._wakeup.notify()
        return generation

    def install_adapter(self, adapter: AdapterWeights) -> Future[int]:
        """Load an adapter between two steps; the future gives its slot (`GenerationRequest.adapter_slot`)."""
        future: Future[int] = Future()

        def install() -> None:
            slot = self._free_slots.pop() if self._free_slots else self._allocate_slot()
            try:
                self.lora.install(slot, adapter)
            except Exception as exc:
                self.lora.remove(slot)
                self._free_slots.append(slot)
                future.set_exception(exc)
            else:
                future.set_result(slot)

        self._run_between_steps(install)
        return future

    def remove_adapter(self, slot: int) -> None:
        """Unload the adapter in `slot` between two steps; no running sequence may still use it."""

        def remove() -> None:
            self.lora.remove(slot)
            self._free_slots.append(slot)

        self._run_between_steps(remove)

    def stats(self) -> dict[str, int]:
        """Counters for /stats; read without locking, so they may be a step old."""
        return {
            "running_sequences": self._running(),
            "waiting_sequences": len(self._waiting),
            "kv_cache_tokens": self.kv_pool.capacity,
            "kv_cache_bytes": self.kv_pool.bytes,
            "kv_cache_reserved_tokens": self.kv_pool.reserved_tokens,
            **self._counters,
        }

    def _allocate_slot(self) -> int:
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        return slot

    def _run_between_steps(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._commands.append(command)
            self._wakeup.notify()

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                with self._wakeup:
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                self._drop_cancelled()
                try:
                    self._admit()
                    if self._prefilling:
                        self._prefill_chunk()
                    if self._decoding:
                        self._decode()
                except Exception as exc:  # e.g. out of memory: fail these sequences, keep serving
                    log.exception("generation step failed")
                    self._end([*self._prefilling, *self._decoding], f"generation failed: {exc}")
        with self._wakeup:
            commands, self._commands = self._commands, []
        for command in commands:  # resolves the futures of adapters queued for insertion
            command()
        everything = [*self._waiting, *self._prefilling, *self._decoding]
        self._end(everything, "the inference server is shutting down")

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once stopping."""
        with self._wakeup:
            while not (self._commands or self._waiting or self._running() or self._stopping):
                self._wakeup.wait()
            if self._stopping:
                return False
            gather_arrivals = self._waiting and not self._running()
        if gather_arrivals:
            time.sleep(self._batch_window_seconds)
        return True

    def _running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    def _admit(self) -> None:
        """Admit waiting requests in order while a row and their KV cache are free."""
        with self._wakeup:
            while self._waiting and self._running() < self._max_batch_size:
                generation = self._waiting[0]
                if generation.cancelled:
                    self._counters["cancelled_sequences"] += 1
                else:
                    blocks = self.kv_pool.reserve(generation.cache_tokens)
                    if blocks is None:  # the next request waits for room, and so do the later ones
                        return
                    generation.row = CacheRow(blocks)
                    self._prefilling.append(generation)
                self._waiting.popleft()

    def _drop_cancelled(self) -> None:
        cancelled = [g for g in (*self._prefilling, *self._decoding) if g.cancelled]
        if cancelled:
            self._counters["cancelled_sequences"] += len(cancelled)
            self._release(cancelled)

    def _prefill_chunk(self) -> None:
        """Feed the oldest prompts their next tokens, as many rows as fit `prefill_chunk_tokens` padded."""
        chunk: list[tuple[Generation, int]] = []
        width = 0
        for generation in self._prefilling:
            count = min(generation.prompt_left, self._prefill_chunk_tokens)
            if chunk and (len(chunk) + 1) * max(width, count) > self._prefill_chunk_tokens:
                break
            chunk.append((generation, count))
            width = max(width, count)
        chunk.sort(key=lambda item: item[0].request.adapter_slot)
        generations = [generation for generation, _ in chunk]
        rows = [generation.admitted_row for generation in generations]
        tokens = [
            generation.request.prompt_ids[row.length : row.length + count]
            for (generation, count), row in zip(chunk, rows, strict=True)
        ]
        batch = RowBatch(self.kv_pool, rows, self._sliding_window)
        logits = self._forward(generations, batch, tokens)
        self._counters["prefills"] += 1
        self._counters["prefill_tokens"] += sum(count for _, count in chunk)
        prefilled = [row for row, generation in enumerate(generations) if generation.prompt_left == 0]
        if not prefilled:
            return
        started = [generations[row] for row in prefilled]
        self._prefilling = [generation for generation in self._prefilling if generation not in started]
        first = self._sample(logits.index_select(0, to_device(prefilled, logits.device)), started)
        self._decoding += self._accept(started, first)
        self._decoding.sort(key=lambda generation: generation.request.adapter_slot)
        self._decode_batch = None

    def _decode(self) -> None:
        if self._decode_batch is None:
            rows = [generation.admitted_row for generation in self._decoding]
            self._decode_batch = RowBatch(self.kv_pool, rows, self._sliding_window)
        tokens = [[generation.last_token] for generation in self._decoding]
        logits = self._forward(self._decoding, self._decode_batch, tokens)
        sampled = self._sample(logits, self._decoding)
        self._counters["decode_steps"] += 1
        self._counters["decoded_tokens"] += len(self._decoding)
        self._accept(self._decoding, sampled)

    def _forward(
        self, generations: list[Generation], batch: RowBatch, tokens: list[list[int]]
    ) -> torch.Tensor:
        """The logits [rows, vocab] after feeding row i `tokens[i]`; their keys and values go to the cache."""
        inputs = batch.feed(tokens)
        self.lora.select_rows([generation.request.adapter_slot for generation in generations])
        output = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=inputs.attention_mask,
            cache=inputs.cache,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :]

    def _sample(self, logits: torch.Tensor, generations: list[Generation]) -> list[int]:
        samplers = [generation.sampler for generation in generations]
        return next_tokens(logits, samplers, [generation.completion_tokens for generation in generations])

    def _accept(self, generations: list[Generation], tokens: list[int]) -> list[Generation]:
        """Hand each generation its token; the generations that go on. The others leave the batch."""
        going_on: list[Generation] = []
        ended: list[Generation] = []
        for generation, token in zip(generations, tokens, strict=True):
            generation.last_token = token
            (going_on if generation.accept(token, self._eos_token_ids) else ended).append(generation)
        self._release(ended)
        return going_on

    def _release(self, generations: list[Generation]) -> None:
        """Take ended generations out of the batch and give their KV cache blocks back."""
        if not generations:
            return
        ended = set(generations)
        for generation in ended:
            if generation.row is not None:
                self.kv_pool.release(generation.row.blocks)
                generation.row = None
        self._prefilling = [generation for generation in self._prefilling if generation not in ended]
        decoding = [generation for generation in self._decoding if generation not in ended]
        if len(decoding) < len(self._decoding):
            self._decoding, self._decode_batch = decoding, None

    def _end(self, generations: list[Generation], message: str) -> None:
        """Tell the generations that have not finished yet that they failed, and free their blocks."""
        for generation in generations:
            generation.emit(Failed(message))
        self._release(generations)
