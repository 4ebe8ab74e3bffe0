"""A small real suite against vLLM's OpenAI-compatible API.

It runs on the instance with OPENAI_BASE_URL and EPHEMERA_MODEL set by ephemera.
The tiny model has random weights, so the tests check the shape of the answers,
never their text.
"""

import json
import os
import urllib.request
from pathlib import Path

import pytest

BASE = os.environ["OPENAI_BASE_URL"].rstrip("/")
MODEL = os.environ["EPHEMERA_MODEL"]


def call(path, payload=None, timeout=60):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(
        BASE + path, data=data,
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'EMPTY')}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


@pytest.mark.smoke
def test_models_lists_the_served_model():
    status, body = call("/models")
    assert status == 200
    assert MODEL in [m["id"] for m in body["data"]]


@pytest.mark.smoke
def test_chat_completion_has_the_openai_shape():
    status, body = call("/chat/completions", {
        "model": MODEL, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]})
    assert status == 200
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert 1 <= body["usage"]["completion_tokens"] <= 8


def test_completion_respects_max_tokens():
    status, body = call("/completions", {"model": MODEL, "prompt": "The sky is", "max_tokens": 5,
                                         "temperature": 0})
    assert status == 200
    assert body["usage"]["completion_tokens"] <= 5
    assert isinstance(body["choices"][0]["text"], str)


def test_unknown_model_is_refused():
    with pytest.raises(urllib.error.HTTPError) as info:
        call("/chat/completions", {"model": "no-such-model", "max_tokens": 1,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert info.value.code == 404


def test_artifacts_directory_is_writable():
    out = Path(os.environ["EPHEMERA_ARTIFACTS"]) / "smoke-notes.txt"
    out.write_text(f"model={MODEL}\n")
    assert out.read_text().startswith("model=")
