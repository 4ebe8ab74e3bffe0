"""Images through a vision-language model's OpenAI-compatible API.

Each image is a PNG made here (standard library only) and sent as a base64 data URL in
a chat message. Tests carry a category marker. With random weights (the built-in tiny
models) only the answer's shape is checked; set VL_CHECK_CONTENT=1 for a real model and
the colour and counting tests check the text too.
"""

import base64
import json
import os
import struct
import urllib.request
import zlib

import pytest

BASE = os.environ["OPENAI_BASE_URL"].rstrip("/")
MODEL = os.environ["EPHEMERA_MODEL"]
CHECK_CONTENT = os.environ.get("VL_CHECK_CONTENT") == "1"


def png(width, height, pixel):
    """A PNG of width x height whose colour at (x, y) is pixel(x, y) -> (r, g, b)."""
    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width))
                    for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def data_url(image):
    return "data:image/png;base64," + base64.b64encode(image).decode()


def ask(image, question, max_tokens=16):
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                    {"type": "text", "text": question}]}]}
    request = urllib.request.Request(
        BASE + "/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'EMPTY')}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        return json.loads(response.read())


def answer_text(body):
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    return choice["message"]["content"]


RED = png(64, 48, lambda x, y: (220, 20, 20))


@pytest.mark.smoke
@pytest.mark.category("shape")
def test_an_image_answer_has_the_openai_shape():
    body = ask(RED, "Describe this image.", max_tokens=8)
    answer_text(body)
    usage = body["usage"]
    assert usage["completion_tokens"] >= 1
    # The image's tokens are part of the prompt: more than the words alone.
    text_only = len("Describe this image.".split())
    assert usage["prompt_tokens"] > text_only + 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.category("shape")
def test_a_larger_image_is_accepted():
    checker = png(300, 200, lambda x, y: (255, 255, 255) if (x // 20 + y // 20) % 2 else (0, 0, 0))
    answer_text(ask(checker, "What pattern is this?"))


@pytest.mark.category("color")
def test_the_colour_of_a_plain_image():
    text = answer_text(ask(RED, "What colour is this image? Answer in one word."))
    if CHECK_CONTENT:
        assert "red" in text.lower()


@pytest.mark.category("counting")
def test_counting_squares():
    def three_squares(x, y):
        inside = 10 <= y < 40 and any(start <= x < start + 30 for start in (10, 60, 110))
        return (20, 20, 220) if inside else (255, 255, 255)

    text = answer_text(ask(png(150, 50, three_squares),
                           "How many blue squares are there? Answer with a number."))
    if CHECK_CONTENT:
        assert "3" in text or "three" in text.lower()
