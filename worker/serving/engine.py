"""Continuous batching: one scheduler thread owns the model and decodes every running sequence together.

Each iteration of the scheduler
1. runs the commands other threads queued (adapter insertions and removals: they only touch the model here,
   between two forward passes),
2. drops the sequences whose client went away,
3. prefills the newly arrived sequences in one left-padded forward pass and merges them into the batch,
4. runs one decode step for all running sequences, whatever their adapters (see `worker.serving.lora`),
5. hands each sequence its text and, when it ended, its finish reason; finished rows leave the batch.

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
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from worker.serving.batch import RunningBatch
from worker.serving.lora import BASE_SLOT, AdapterWeights, MultiLora
from worker.serving.sampling import Sampler, next_tokens
from worker.serving.text import CompletionText

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
        self.cancelled = False
        self.finished = False  # its Finished or Failed event went out
        self._sink = sink
        self._text = text

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
    """Batched generation over one base model and its loaded LoRA adapters."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 32,
        batch_window_seconds: float = 0.002,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer  # for callers, to encode prompts
        # The scheduler decodes with a copy of its own: a fast tokenizer used by two threads at once can fail
        # with "Already borrowed".
        self._decoding_tokenizer = copy.deepcopy(tokenizer)
        self.context_length: int = model.config.max_position_embeddings
        self.lora = MultiLora(model)
        self._max_batch_size = max_batch_size
        self._batch_window_seconds = batch_window_seconds
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self._eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos_token_ids)
        )
        self._device = model.device
        self._wakeup = threading.Condition()
        self._commands: list[Callable[[], None]] = []  # run on the scheduler thread between steps
        self._waiting: deque[Generation] = deque()
        self._running: list[Generation] = []
        self._batch: RunningBatch | None = None
        self._free_slots: list[int] = []
        self._next_slot = BASE_SLOT + 1
        self._stopping = False
        self._counters = {"prefills": 0, "decode_steps": 0, "decoded_tokens": 0, "cancelled_sequences": 0}
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
        self.check_length(len(request.prompt_ids), request.max_tokens)
        sampler = Sampler(request.temperature, request.top_p, request.seed, self._device)
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
            "running_sequences": len(self._running),
            "waiting_sequences": len(self._waiting),
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
                commands, arrivals = self._take_inbox()
                for command in commands:
                    command()
                self._drop_cancelled()
                try:
                    if arrivals:
                        self._prefill(arrivals)
                    if self._running:
                        self._decode()
                except Exception as exc:  # e.g. out of memory: fail this batch, keep serving
                    log.exception("generation step failed")
                    self._fail([*arrivals, *self._running], f"generation failed: {exc}")
                    self._running, self._batch = [], None
        with self._wakeup:
            commands, self._commands = self._commands, []
        for command in commands:  # resolves the futures of adapters queued for insertion
            command()
        self._fail([*self._waiting, *self._running], "the inference server is shutting down")

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once stopping."""
        with self._wakeup:
            while not (self._commands or self._waiting or self._running or self._stopping):
                self._wakeup.wait()
            if self._stopping:
                return False
            gather_arrivals = self._waiting and not self._running
        if gather_arrivals:
            time.sleep(self._batch_window_seconds)
        return True

    def _take_inbox(self) -> tuple[list[Callable[[], None]], list[Generation]]:
        with self._wakeup:
            commands, self._commands = self._commands, []
            arrivals = []
            while self._waiting and len(self._running) + len(arrivals) < self._max_batch_size:
                generation = self._waiting.popleft()
                if generation.cancelled:
                    self._counters["cancelled_sequences"] += 1
                else:
                    arrivals.append(generation)
        return commands, arrivals

    def _drop_cancelled(self) -> None:
        kept = [row for row, generation in enumerate(self._running) if not generation.cancelled]
        self._counters["cancelled_sequences"] += len(self._running) - len(kept)
        self._keep_rows(kept)

    def _prefill(self, arrivals: list[Generation]) -> None:
        ids, mask, positions = RunningBatch.prompt_inputs(
            [generation.request.prompt_ids for generation in arrivals], self._pad_id, self._device
        )
        cache = DynamicCache()
        logits = self._forward(arrivals, ids, mask, positions, cache, logits_to_keep=1)
        tokens = next_tokens(logits, [generation.sampler for generation in arrivals])
        self._counters["prefills"] += 1
        batch = RunningBatch(cache, mask, positions[:, -1] + 1, tokens)
        kept = self._accept(arrivals, tokens)
        if not kept:
            return
        if len(kept) < len(arrivals):
            batch.keep(kept)
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.extend(batch)
        self._running += [arrivals[row] for row in kept]

    def _decode(self) -> None:
        ids, mask, positions = self._batch.step_inputs()
        logits = self._forward(self._running, ids, mask, positions, self._batch.cache)
        tokens = next_tokens(logits, [generation.sampler for generation in self._running])
        self._counters["decode_steps"] += 1
        self._counters["decoded_tokens"] += len(self._running)
        self._batch.advance(mask, tokens)
        self._keep_rows(self._accept(self._running, tokens))

    def _forward(
        self,
        generations: list[Generation],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        **kwargs,
    ) -> torch.Tensor:
        """The last position's logits [rows, vocab]; `cache` grows by the columns of `ids`."""
        self.lora.select_rows([generation.request.adapter_slot for generation in generations])
        output = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **kwargs
        )
        return output.logits[:, -1, :]

    def _accept(self, generations: list[Generation], tokens: torch.Tensor) -> list[int]:
        """Hand each generation its token; the rows that go on."""
        return [
            row
            for row, (generation, token) in enumerate(zip(generations, tokens.tolist(), strict=True))
            if generation.accept(token, self._eos_token_ids)
        ]

    def _keep_rows(self, kept: list[int]) -> None:
        if len(kept) == len(self._running):
            return
        self._running = [self._running[row] for row in kept]
        if kept:
            self._batch.keep(kept)
        else:
            self._batch = None

    def _fail(self, generations: list[Generation], message: str) -> None:
        """Tell the generations that have not finished yet that they failed."""
        for generation in generations:
            generation.emit(Failed(message))
