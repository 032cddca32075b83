"""A local Anthropic-compatible Messages API over real HTTP, scripted per scenario.

The real ``anthropic`` SDK talks to it as it would to the API: point
``AsyncAnthropic(base_url=scenario.base_url)`` at a scenario, and each
``POST <base_url>/v1/messages`` gets the reply its responder picks for the request body:
an answer, a delay, an HTTP error with headers, or a malformed body. Every request body and
every usage figure reported is recorded on the scenario.

In tests, ``FakeAnthropicServer`` runs uvicorn in a background thread (its own event loop,
a free loopback port), one server per session and a scenario per test. The benchmark runs it
as a process of its own, so that the server's work does not share the measured process::

    python tests/service/explain/fake_anthropic.py --latency-ms 300

prints one JSON line ``{"base_url": ...}`` once it is listening.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Body = dict[str, Any]

GROUNDED_TEXT = {
    "en": "A good match for what you have chosen.",
    "de": "Passt gut zu Ihrer Auswahl.",
}


@dataclass(frozen=True)
class Reply:
    """What the server answers to one request."""

    text: str | None = None  # the single text block's text
    status: int = 200
    delay_s: float = 0.0  # sleep before answering
    content: list[dict[str, Any]] | None = None  # raw content blocks, instead of ``text``
    omit_content: bool = False  # a Message without its ``content`` field
    raw_body: bytes | None = None  # sent as is, as application/json (e.g. invalid JSON)
    error_type: str = "api_error"  # ``error.type`` of an error body
    headers: dict[str, str] = field(default_factory=dict)
    input_tokens: int | None = None  # None: estimated from the request's size
    output_tokens: int | None = None  # None: estimated from the answer's size

    @classmethod
    def explanation(cls, text: str, *, delay_s: float = 0.0) -> Reply:
        """An answer in the format the prompt asks for: ``{"explanation": text}``."""
        return cls(text=json.dumps({"explanation": text}), delay_s=delay_s)

    @classmethod
    def error(cls, status: int, error_type: str, **headers: str) -> Reply:
        return cls(status=status, error_type=error_type, headers=headers)


Responder = Callable[[Body], Reply]


def prompt_text(body: Body) -> str:
    """System prompt and user messages of a request, as one string."""
    parts = [str(body.get("system", ""))]
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(str(block.get("text", "")) for block in content or [])
    return "\n".join(parts)


def product_facts(body: Body) -> Any:
    """The JSON in the user message's ``<product_facts>`` block (None without one)."""
    user = "\n".join(
        message["content"]
        for message in body.get("messages", [])
        if message.get("role") == "user" and isinstance(message.get("content"), str)
    )
    if "<product_facts>" not in user:
        return None
    block = user.rsplit("<product_facts>", 1)[1].split("</product_facts>", 1)[0]
    try:
        return json.loads(block)
    except ValueError:
        return None


def product_entries(body: Body) -> list[Body] | None:
    """The entries of a batch prompt's ``<product_facts>`` list; None for a one-product
    prompt (whose block is a single object)."""
    facts = product_facts(body)
    return facts if isinstance(facts, list) else None


def answer_each(body: Body, write: Callable[[Body], str], *, delay_s: float = 0.0) -> Reply:
    """An answer in the format the prompt asks for, ``write(facts)`` for each product: one
    ``{"explanation": ...}``, or ``{"explanations": [{"id", "explanation"}, ...]}`` for a
    batch prompt."""
    entries = product_entries(body)
    if entries is None:
        return Reply.explanation(write(product_facts(body) or {}), delay_s=delay_s)
    answers = [{"id": entry["id"], "explanation": write(entry)} for entry in entries]
    return Reply(text=json.dumps({"explanations": answers}), delay_s=delay_s)


def grounded_reply(body: Body, *, delay_s: float = 0.0) -> Reply:
    """A valid explanation for each product, in the language the system prompt asks for,
    naming nothing."""
    language = "de" if "Write in German" in str(body.get("system", "")) else "en"
    return answer_each(body, lambda facts: GROUNDED_TEXT[language], delay_s=delay_s)


@dataclass
class Scenario:
    base_url: str
    responder: Responder
    requests: list[Body] = field(default_factory=list)
    usage_reported: list[tuple[int, int]] = field(default_factory=list)  # (in, out) per answer
    in_flight: int = 0
    max_in_flight: int = 0  # most requests the server was answering at once

    @property
    def calls(self) -> int:
        return len(self.requests)


class FakeAnthropicApp:
    """The Starlette app: ``POST /s/{scenario}/v1/messages``."""

    def __init__(self) -> None:
        self._scenarios: dict[str, Scenario] = {}
        self._ids = itertools.count(1)
        # Set on the server's loop when it stops: delayed answers end at once, so shutdown
        # never waits for (or cancels) a handler still sleeping for a test long finished.
        self.stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app = Starlette(
            routes=[Route("/s/{scenario}/v1/messages", self._messages, methods=["POST"])]
        )

    def add(self, name: str, scenario: Scenario) -> None:
        self._scenarios[name] = scenario

    async def _stopped_while_sleeping(self, seconds: float) -> bool:
        if self.stopping is None:
            self.stopping, self.loop = asyncio.Event(), asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _messages(self, request: Request) -> Response:
        scenario = self._scenarios.get(request.path_params["scenario"])
        if scenario is None:
            return JSONResponse(
                {"type": "error", "error": {"type": "not_found_error", "message": "no scenario"}},
                status_code=404,
            )
        body: Body = await request.json()
        scenario.requests.append(body)
        reply = scenario.responder(body)
        scenario.in_flight += 1
        scenario.max_in_flight = max(scenario.max_in_flight, scenario.in_flight)
        try:
            if reply.delay_s and await self._stopped_while_sleeping(reply.delay_s):
                return Response(status_code=503)  # the server is stopping: nobody reads this
        finally:
            scenario.in_flight -= 1
        if reply.raw_body is not None:
            return Response(
                reply.raw_body,
                status_code=reply.status,
                media_type="application/json",
                headers=reply.headers,
            )
        if reply.status != 200:
            error = {"type": reply.error_type, "message": "scripted failure"}
            return JSONResponse(
                {"type": "error", "error": error},
                status_code=reply.status,
                headers=reply.headers,
            )
        content = (
            reply.content
            if reply.content is not None
            else [{"type": "text", "text": reply.text or ""}]
        )
        usage = (
            reply.input_tokens
            if reply.input_tokens is not None
            else len(prompt_text(body)) // 4 + 1,
            reply.output_tokens
            if reply.output_tokens is not None
            else len(json.dumps(content)) // 4 + 1,
        )
        scenario.usage_reported.append(usage)
        message: Body = {
            "id": f"msg_fake_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "unknown"),
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
        }
        if not reply.omit_content:
            message["content"] = content
        return JSONResponse(message, headers=reply.headers)


class FakeAnthropicServer:
    """The app served by uvicorn in a daemon thread on a free loopback port."""

    def __init__(self) -> None:
        self._app = FakeAnthropicApp()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(
                self._app.app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self, *, timeout_s: float = 10.0) -> None:
        self._thread.start()
        give_up_at = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > give_up_at or not self._thread.is_alive():
                raise RuntimeError("the fake Anthropic server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        stopping, loop = self._app.stopping, self._app.loop
        if stopping is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._socket.close()

    def scenario(self, responder: Responder, *, name: str | None = None) -> Scenario:
        """A new scenario answering with ``responder``; its ``base_url`` is for the SDK."""
        name = name or uuid.uuid4().hex[:12]
        scenario = Scenario(base_url=f"http://127.0.0.1:{self.port}/s/{name}", responder=responder)
        self._app.add(name, scenario)
        return scenario


def main(argv: list[str] | None = None) -> None:
    """Serve one scenario, ``bench``, answering grounded text after ``--latency-ms``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=300.0)
    args = parser.parse_args(argv)
    server = FakeAnthropicServer()
    latency_s = args.latency_ms / 1000
    scenario = server.scenario(lambda body: grounded_reply(body, delay_s=latency_s), name="bench")
    server.start()
    print(json.dumps({"base_url": scenario.base_url}), flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin (or exits)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
