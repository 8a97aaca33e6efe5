"""The Teacher behind an OpenAI-compatible HTTP endpoint (e.g. the team's vLLM server), same ``generate``
as :class:`~bbuqc_lightning.generation.engine.GenerationEngine`, so the runner cannot tell them apart.

Useful when Qwen3-32B already runs as a server (``vllm serve Qwen/Qwen3-32B --tensor-parallel-size 2``):
no 65 GB load in the training process. Select it with the ``generation`` group (the local ``model`` is then only
a placeholder; take the tiny one)::

    python tools/distill.py model=tiny_text generation=openai generation.base_url=http://vllm-host:8000/v1 \
        generation.model=Qwen/Qwen3-32B

One ``POST {base_url}/chat/completions`` per conversation with ``n`` = K samples, ``max_concurrency`` of
them at a time. ``chat_template_kwargs.enable_thinking`` and ``top_k`` are vLLM/SGLang extensions of the
OpenAI schema (``extra_body`` adds others). A think block in ``content`` is stripped later by the
Stage-B parser; with vLLM's ``--reasoning-parser qwen3`` the server already moves it out of ``content``.
The API key, if the server wants one, is read from the environment variable named by ``api_key_env``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bbuqc_lightning.generation.sampling import Completion, SamplingParams


class EndpointError(RuntimeError):
    """The endpoint failed or answered something that is not a chat completion (message names the URL)."""


class OpenAICompatibleEngine:
    """``generate(conversations, params) -> [[Completion] * n] * len(conversations)`` over HTTP."""

    def __init__(
        self,
        local_model: Any = None,
        processor: Any = None,
        *,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        enable_thinking: bool = False,
        max_concurrency: int = 8,
        timeout_s: float = 600.0,
        retries: int = 2,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        del local_model, processor  # built like the local engine (``generation(model, processor)``), unused
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = model  # what the distillation file records as the Teacher
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.enable_thinking = enable_thinking
        self.max_concurrency = max(1, max_concurrency)
        self.timeout_s = timeout_s
        self.retries = retries
        self.extra_body = dict(extra_body or {})

    def generate(
        self, conversations: Sequence[Sequence[dict]], params: SamplingParams
    ) -> list[list[Completion]]:
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(
                pool.map(lambda i: self._complete(i, conversations[i], params), range(len(conversations)))
            )

    def payload(self, conversation: Sequence[dict], params: SamplingParams) -> dict[str, Any]:
        """The request body for one conversation."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in conversation],
            "n": params.num_return_sequences,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature if params.do_sample else 0.0,
            "top_p": params.top_p if params.do_sample else 1.0,
            "chat_template_kwargs": {"enable_thinking": self.enable_thinking},
        }
        if params.do_sample and params.top_k:
            body["top_k"] = params.top_k
        body.update(self.extra_body)
        return body

    def _complete(self, index: int, conversation: Sequence[dict], params: SamplingParams) -> list[Completion]:
        data = self._post(self.payload(conversation, params))
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != params.num_return_sequences:
            raise EndpointError(
                f"{self.url}: expected {params.num_return_sequences} choices, got {str(data)[:300]}"
            )
        ordered = sorted(choices, key=lambda c: c.get("index", 0))
        return [
            Completion(
                index, (c.get("message") or {}).get("content") or "", [], c.get("finish_reason") == "length"
            )
            for c in ordered
        ]

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode("utf-8"), headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                error = EndpointError(
                    f"{self.url}: HTTP {err.code}: {err.read()[:300].decode('utf-8', 'replace')}"
                )
                if err.code < 500:  # a request the server refuses will be refused again
                    raise error from err
            except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as err:
                error = EndpointError(f"{self.url}: {type(err).__name__}: {err}")
            if attempt < self.retries:
                time.sleep(2**attempt)
        raise error
