"""Hostile input for the readers of machine lists: a catalog CSV (a user's file, the
built-in one, a cache) and nvidia-smi's GPU list (this machine, a Docker host, an SSH
host). Each property: the reader returns valid offers, or raises the project's typed
error for bad catalog input, within the time and memory bounds of tests/hostile.py.
nvidia-smi output is never an error: lines that describe no GPU are skipped."""

from __future__ import annotations

import math

from ephemera_providers.local import nvidia_offers, parse_nvidia_smi
from hypothesis import given
from hypothesis import strategies as st

from ephemera.errors import ConfigError
from ephemera.provider import Offer
from ephemera.sizing.catalog import COLUMNS, MAX_COMPUTE_CAPABILITY, load_catalog, parse_catalog
from tests.hostile import bounded

HEADER = ",".join(COLUMNS) + ",spot,compute_capability"

# Field values that have broken CSV and number readers elsewhere.
NASTY = st.sampled_from([
    "", " ", "0", "-0", "1", "-1", "8.9", "nan", "NaN", "inf", "-inf", "1e309", "1e-400",
    "9" * 5000, "1_000", "0x10", "١٢", "²", "１６", "\x00", '"', '""', "'", "a,b", "\\", "#",
    "true", "spot", "None", "\u202e", "\ufeff", "T4", "H100", "\t8.0\t",
])
FIELD = st.one_of(NASTY, st.text(max_size=30))


def assert_valid_offer(offer: Offer) -> None:
    assert isinstance(offer, Offer)
    assert offer.provider.strip() and offer.instance_type.strip()
    assert isinstance(offer.gpu_count, int) and offer.gpu_count >= 0
    for value in (offer.gpu_memory_gib, offer.memory_gib, offer.price_per_hour):
        assert math.isfinite(value) and value >= 0
    assert isinstance(offer.vcpus, int) and offer.vcpus >= 0
    if offer.gpu_count:
        assert offer.gpu and offer.gpu_memory_gib > 0
    else:
        assert offer.gpu is None and offer.compute_capability is None
    cap = offer.compute_capability
    assert cap is None or (math.isfinite(cap) and 1 <= cap < MAX_COMPUTE_CAPABILITY)


def check_catalog(text: str) -> None:
    outcome = bounded(lambda: parse_catalog(text, "hostile.csv"), (ConfigError,))
    if outcome.error is not None:
        assert "hostile.csv" in str(outcome.error)
        return
    for offer in outcome.value:
        assert_valid_offer(offer)


@given(st.text(max_size=2000))
def test_any_text_as_a_catalog(text):
    check_catalog(text)


@given(st.text(max_size=2000))
def test_any_text_after_a_valid_header(text):
    check_catalog(HEADER + "\n" + text)


@given(st.lists(st.lists(FIELD, min_size=9, max_size=12), max_size=20))
def test_rows_of_hostile_fields(rows):
    check_catalog("\n".join([HEADER] + [",".join(row) for row in rows]))


@given(st.lists(st.tuples(FIELD, FIELD, FIELD, FIELD), max_size=20))
def test_hostile_numbers_in_otherwise_good_rows(rows):
    lines = [HEADER] + [f"aws,g5.xlarge,us-east-1,A10G,{count},{mem},4,{price},1.0,false,{cap}"
                        for count, mem, price, cap in rows]
    check_catalog("\n".join(lines))


@given(st.binary(max_size=2000))
def test_any_bytes_as_a_catalog_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("catalog") / "hostile.csv"
    path.write_bytes(data)
    outcome = bounded(lambda: load_catalog(path), (ConfigError,))
    for offer in outcome.value or []:
        assert_valid_offer(offer)


def test_a_large_catalog_is_read_within_the_bound():
    row = "aws,g5.xlarge,us-east-1,A10G,1,22.06,4,16,1.006,false,8.6"
    outcome = bounded(lambda: parse_catalog("\n".join([HEADER] + [row] * 5_000), "big.csv"),
                      (ConfigError,))
    assert outcome.error is None and len(outcome.value) == 5_000


def check_nvidia_smi(text: str) -> None:
    outcome = bounded(lambda: nvidia_offers("ssh", "ssh:host", text, 8, 32.0), ())
    offers = outcome.value
    assert len(offers) <= 1
    for offer in offers:
        assert_valid_offer(offer)
        assert offer.gpu_count >= 1 and offer.price_per_hour == 0.0
    for name, gib, cap in bounded(lambda: parse_nvidia_smi(text), ()).value:
        assert name and math.isfinite(gib) and gib > 0
        assert cap is None or 1 <= cap < MAX_COMPUTE_CAPABILITY


@given(st.text(max_size=2000))
def test_any_text_as_nvidia_smi_output(text):
    check_nvidia_smi(text)


@given(st.lists(st.lists(FIELD, min_size=1, max_size=4), max_size=20))
def test_nvidia_smi_lines_of_hostile_fields(lines):
    check_nvidia_smi("\n".join(", ".join(fields) for fields in lines))


def test_a_large_nvidia_smi_output_is_read_within_the_bound():
    text = "NVIDIA H100 80GB HBM3, 81559, 9.0\n" * 10_000
    outcome = bounded(lambda: nvidia_offers("local", "local-gpu", text, 8, 32.0), ())
    assert outcome.value[0].gpu_count == 10_000
