"""An ASGI app served for real on a loopback port, from a daemon thread: what the server tests talk to
with httpx, the openai client or schemathesis."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on a free port until :meth:`stop` (or the end of a ``with`` block)."""

    def __init__(self, app, log_level: str = "warning", start_timeout: float = 30.0, **config):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level,
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + start_timeout
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "LiveServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def add_chat_template(path: str) -> str:
    """Writes CHAT_TEMPLATE into the tokenizer_config.json of the model at ``path``; returns ``path``."""
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["chat_template"] = CHAT_TEMPLATE
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path


def assert_serves_as(want_url: str, got_url: str, model: str) -> None:
    """Completions (greedy, seeded sampling, log-probs; whole and streamed) and a chat completion from
    the server at ``got_url`` equal those of the one at ``want_url``, through the official client."""
    import openai

    def client(url):
        return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

    alone, routed = client(want_url), client(got_url)
    for prompt, kw in [("def add(a, b):", dict(temperature=0)),
                       ("The quick brown fox", dict(temperature=0.8, seed=5, top_p=0.9)),
                       ("for i in range(10):", dict(temperature=0, logprobs=2))]:
        want = alone.completions.create(model=model, prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True},
                                        **kw)
        got = routed.completions.create(model=model, prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True},
                                        **kw)
        assert got.choices[0].text == want.choices[0].text
        assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == want.usage.prompt_tokens
        streamed = "".join(c.choices[0].text for c in routed.completions.create(
            model=model, prompt=prompt, max_tokens=12, stream=True, extra_body={"ignore_eos": True}, **kw)
            if c.choices)
        assert streamed == want.choices[0].text
    messages = [{"role": "user", "content": "hello there"}]
    want = alone.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    got = routed.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want.choices[0].message.content
