"""A small retail-style benchmark, by category: store compliance, shelf layout and
kitchen safety. Each check asks the served model one question and checks the shape of
the answer; with a real model it also checks the answer names what it must.

RETAIL_CHECK_ANSWERS says whose answers are checked: "all", or a comma-separated list
of categories and check ids. The built-in tiny model has random weights, so the CPU
example job leaves it empty (shape only).
"""

import json
import os
import urllib.request

import pytest

BASE = os.environ["OPENAI_BASE_URL"].rstrip("/")
MODEL = os.environ["EPHEMERA_MODEL"]
CHECKED = {x.strip() for x in os.environ.get("RETAIL_CHECK_ANSWERS", "").split(",") if x.strip()}

CHECKS = [
    ("compliance", "price-label", "Every shelf price label must show which two things?",
     ["price", "unit"]),
    ("compliance", "age-restricted", "What must a cashier check before selling alcohol?",
     ["age", "id"]),
    ("compliance", "allergen-notice", "Where must allergen information for loose bakery "
     "goods be shown?", ["allergen"]),
    ("shelf_layout", "eye-level", "Which products belong at eye level on a shelf?",
     ["best", "sell"]),
    ("shelf_layout", "facing", "What does 'facing' mean in shelf layout?", ["front"]),
    ("shelf_layout", "end-cap", "What is an end cap used for in a store?", ["promotion"]),
    ("kitchen_safety", "fridge-temperature", "What is the highest safe temperature for a "
     "commercial fridge, in degrees Celsius?", ["5"]),
    ("kitchen_safety", "cross-contamination", "How do you keep raw meat from contaminating "
     "ready-to-eat food?", ["separate"]),
    ("kitchen_safety", "hand-washing", "When must kitchen staff wash their hands?",
     ["before"]),
]


def ask(question: str, max_tokens: int = 16) -> dict:
    payload = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
               "messages": [{"role": "user", "content": question}]}
    request = urllib.request.Request(
        BASE + "/chat/completions", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'EMPTY')}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.mark.parametrize("category,check,question,expected", [
    pytest.param(*c, id=c[1], marks=pytest.mark.category(c[0])) for c in CHECKS])
def test_retail_check(category, check, question, expected):
    body = ask(question)
    answer = body["choices"][0]["message"]["content"]
    assert isinstance(answer, str)
    assert 1 <= body["usage"]["completion_tokens"] <= 16
    if {"all", category, check} & CHECKED:
        lowered = answer.lower()
        missing = [word for word in expected if word not in lowered]
        assert not missing, f"the answer does not mention {missing}: {answer!r}"
