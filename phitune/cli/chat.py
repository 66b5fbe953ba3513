"""`phitune chat`: talk to a base or fine-tuned model, one question or a conversation, each answer streamed
from /v1/chat/completions as it is generated."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.text import Text

from phitune.cli.options import ApiKey, BaseUrl, connected
from phitune.cli.output import console, fail, printable
from phitune.client import DEFAULT_BASE_URL, Client, json_object

QUIT = {"exit", "quit", "/exit", "/quit"}


def answer(client: Client, request: dict[str, Any]) -> str:
    """Stream one completion to stdout as it arrives; returns its text."""
    parts: list[str] = []
    for data in client.events("POST", "/v1/chat/completions", json={**request, "stream": True}):
        if data == "[DONE]":
            typer.echo()
            return "".join(parts)
        chunk = json_object(data)
        if "error" in chunk:  # generation failed mid-stream: the server ends the stream with the error
            typer.echo()
            fail(chunk["error"].get("message", "the generation failed"))
        for choice in chunk.get("choices") or []:
            if text := (choice.get("delta") or {}).get("content"):
                parts.append(text)
                # On a terminal, a model's output cannot send it escape sequences; piped, it is as it came.
                sys.stdout.write(printable(text) if sys.stdout.isatty() else text)
                sys.stdout.flush()
    typer.echo()
    fail("the answer's stream ended before its end ([DONE])")


def chat(
    model: Annotated[str, typer.Argument(help="A model id: a base model or ft:… (`phitune models list`).")],
    prompt: Annotated[
        str | None,
        typer.Argument(help="Ask this once and exit ('-' reads it from stdin); none: a conversation."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message to start with.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer, at most.")] = 256,
    temperature: Annotated[float, typer.Option(min=0, help="0: greedy, the same answer every time.")] = 0.7,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = None,
) -> None:
    """Chat with a model: one question with PROMPT, else a conversation (an empty line or Ctrl-D ends it)."""
    messages = [{"role": "system", "content": system}] if system else []
    settings = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    with connected(base_url, api_key) as client:
        if prompt is not None:
            question = sys.stdin.read() if prompt == "-" else prompt
            answer(client, {**settings, "messages": [*messages, {"role": "user", "content": question}]})
            return
        console.print(f"Chatting with {model}; an empty line, exit or Ctrl-D ends it.", style="dim")
        while True:
            try:
                question = console.input(Text("you> ", style="bold"))
            except EOFError:  # Ctrl-D: the conversation's end
                typer.echo()
                return
            except KeyboardInterrupt:  # Ctrl-C: interrupted, as everywhere else (exit status 130)
                typer.echo()
                raise typer.Exit(130) from None
            if not question.strip() or question.strip() in QUIT:
                return
            messages.append({"role": "user", "content": question})
            console.print(Text(f"{model}> ", style="bold"), end="")
            messages.append(
                {"role": "assistant", "content": answer(client, {**settings, "messages": messages})}
            )
