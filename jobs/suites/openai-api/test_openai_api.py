"""Checks of vLLM's OpenAI-compatible API for one served model. Assertions are on the
shape of answers, so the suite also passes against a model with random weights."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

TIMEOUT = 120


def chat(base_url, model, text, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": 16, "temperature": 0, **extra}
    response = requests.post(f"{base_url}/chat/completions", json=body, timeout=TIMEOUT)
    response.raise_for_status()
    return response.json()


@pytest.mark.smoke
def test_model_is_listed(base_url, model):
    response = requests.get(f"{base_url}/models", timeout=TIMEOUT)
    response.raise_for_status()
    assert model in [entry["id"] for entry in response.json()["data"]]


@pytest.mark.smoke
def test_chat_completion_has_a_choice(base_url, model):
    answer = chat(base_url, model, "Say hello.")
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] >= 1


def test_max_tokens_is_honoured(base_url, model):
    answer = chat(base_url, model, "Count to one hundred.", max_tokens=5)
    assert answer["usage"]["completion_tokens"] <= 5


def test_streaming_sends_chunks(base_url, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "stream": True}
    with requests.post(f"{base_url}/chat/completions", json=body, stream=True,
                       timeout=TIMEOUT) as response:
        response.raise_for_status()
        lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]" and len(lines) >= 2


def test_served_context_length(base_url, model):
    expected = os.environ.get("EXPECTED_MAX_MODEL_LEN")
    if not expected:
        pytest.skip("EXPECTED_MAX_MODEL_LEN not set")
    entry = next(e for e in requests.get(f"{base_url}/models", timeout=TIMEOUT).json()["data"]
                 if e["id"] == model)
    assert entry["max_model_len"] == int(expected)


@pytest.mark.load
def test_concurrent_requests_all_succeed(base_url, model):
    if os.environ.get("RUN_LOAD_TESTS") != "1":
        pytest.skip("load tests run in the release tier (RUN_LOAD_TESTS=1)")
    total = int(os.environ.get("LOAD_REQUESTS", "64"))
    workers = int(os.environ.get("LOAD_CONCURRENCY", "8"))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = list(pool.map(lambda i: chat(base_url, model, f"Request {i}"), range(total)))
    assert len(answers) == total
    assert all(a["choices"] for a in answers)
