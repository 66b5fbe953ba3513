"""Chat prompts rendered and tokenised off the event loop, so that a 1 MB prompt never stalls a one-line chat.

Tokenising a 1 MB prompt takes about a second of CPU. On the server's event loop, four such prompts held
every other request for seconds. Prompts are encoded on threads instead (tokenizers' Rust code releases the
GIL while it works): short ones on a pool of their own, so that they never queue behind long ones; long ones
on a small pool, so that however many arrive they take at most that many cores from the engine's thread.
Each thread has its own copy of the tokenizer: a fast tokenizer used by two threads at once can fail with
"Already borrowed".
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from transformers import PreTrainedTokenizerBase

LIGHT_PROMPT_CHARS = 16 * 1024  # a prompt shorter than this tokenises in milliseconds
LIGHT_THREADS = 2
HEAVY_THREADS = 2


class PromptEncoder:
    """Turns chat messages into the prompt's token ids (chat template, generation prompt added)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        light_threads: int = LIGHT_THREADS,
        heavy_threads: int = HEAVY_THREADS,
    ) -> None:
        self._tokenizer = tokenizer
        self._local = threading.local()  # each thread's own tokenizer
        self._light = ThreadPoolExecutor(light_threads, thread_name_prefix="prompt-light")
        self._heavy = ThreadPoolExecutor(heavy_threads, thread_name_prefix="prompt-heavy")

    async def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids, computed on a thread of the pool that the prompt's length picks."""
        chars = sum(len(message["content"]) for message in messages)
        pool = self._light if chars < LIGHT_PROMPT_CHARS else self._heavy
        return await asyncio.wrap_future(pool.submit(self._encode, messages))

    def close(self) -> None:
        self._light.shutdown(wait=True, cancel_futures=True)
        self._heavy.shutdown(wait=True, cancel_futures=True)

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        # Tokenized, without return_dict, the template gives the ids; transformers types every result it can.
        template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        return cast(list[int], template)
