"""A model's config.json on hostile input: reading it and estimating from it ends in an
estimate made of finite, non-negative figures or a ConfigError naming the field, within
the time and memory bounds of tests/hostile.py. Sizes may be zero, negative, huge,
fractional, non-finite or of the wrong type; the file may be mangled JSON."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ephemera.errors import ConfigError
from ephemera.sizing.estimate import Estimate, estimate
from ephemera.sizing.modelconfig import load_model
from tests.hostile import bounded

REF = Path(__file__).parent / "data" / "reference-models"
REAL = {d.name: json.loads((d / "config.json").read_text())
        for d in sorted(REF.iterdir()) if (d / "config.json").is_file()}
SIZE_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "intermediate_size", "max_position_embeddings",
               "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "decoder_sparse_step", "partial_rotary_factor",
               "n_embd", "d_model", "padded_vocab_size"]
OTHER_FIELDS = ["architectures", "model_type", "torch_dtype", "tie_word_embeddings",
                "mlp_only_layers", "quantization_config", "text_config", "vision_config",
                "attention_bias", "mlp_bias"]

HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 10**30, -(10**30), 10**400, 2**63, 2**18 + 1, 0.5,
                     4096.0, 1e308, float("inf"), float("-inf"), float("nan"), True, False,
                     None, "4096", "", [], {}, [4096], {"a": 1}, "x" * 10_000]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
NESTED = st.fixed_dictionaries({}, optional={
    "hidden_size": HOSTILE, "num_hidden_layers": HOSTILE, "num_attention_heads": HOSTILE,
    "vocab_size": HOSTILE, "intermediate_size": HOSTILE, "depth": HOSTILE,
    "quant_method": st.sampled_from(["awq", "gptq", "fp8", "modelopt", "compressed-tensors",
                                     "bitsandbytes", "mxfp4", "other"]) | HOSTILE,
    "bits": HOSTILE, "group_size": HOSTILE, "num_bits": HOSTILE, "quant_algo": HOSTILE,
    "config_groups": HOSTILE | st.dictionaries(st.text(max_size=4), st.dictionaries(
        st.sampled_from(["weights", "input_activations"]),
        st.fixed_dictionaries({}, optional={"num_bits": HOSTILE, "group_size": HOSTILE,
                                            "type": HOSTILE})), max_size=2)})

WORKDIR = Path(tempfile.mkdtemp(prefix="ephemera-hostile-config-"))


def check_config(data: bytes, **settings) -> None:
    """The property: an estimate of finite, non-negative figures, or a ConfigError."""
    (WORKDIR / "config.json").write_bytes(data)

    def read_and_estimate() -> Estimate:
        return estimate(load_model(str(WORKDIR)), **settings)

    outcome = bounded(read_and_estimate, (ConfigError,))
    if outcome.error is not None:
        assert outcome.error.exit_code == 2 and len(str(outcome.error)) < 1000
        return
    result = outcome.value
    for name, value in result.to_dict().items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert math.isfinite(value) and value >= 0, (name, value)
    assert result.required_gib_per_gpu > 0


@given(base=st.sampled_from(sorted(REAL)),
       changes=st.dictionaries(st.sampled_from(SIZE_FIELDS + OTHER_FIELDS), HOSTILE | NESTED,
                               min_size=1, max_size=4),
       tp=st.sampled_from([1, 2, 4, 8]), max_model_len=st.sampled_from([1, 4096, 10_000_000]))
def test_config_fields(base, changes, tp, max_model_len):
    config = {**REAL[base], **changes}
    try:
        data = json.dumps(config).encode()
    except ValueError:  # an integer too long to write: the reader must refuse it too
        data = b'{"hidden_size": ' + b"9" * 5000 + b"}"
    check_config(data, tensor_parallel_size=tp, max_model_len=max_model_len)


JSON_SNIPPETS = ["{", "}", "[", "]", ",", ":", '"', "\\", "null", "NaN", "Infinity",
                 "-Infinity", "1e999", "9" * 5000, "0", "-1", "\ufeff", "\x00", "\ud800",
                 '"hidden_size": 0', '"num_attention_heads": 0', '"vocab_size": 1e30']


@st.composite
def mangled(draw) -> bytes:
    text = json.dumps(REAL[draw(st.sampled_from(sorted(REAL)))], indent=1)
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(JSON_SNIPPETS) | st.text(max_size=5)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
    return text.encode("utf-8", errors="surrogatepass")


@given(data=mangled())
def test_mangled_json(data):
    check_config(data)


@given(depth=st.integers(1, 200_000), kind=st.sampled_from(["[", '{"a":']),
       prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\x80"]))
def test_deep_or_odd_bytes(depth, kind, prefix):
    closing = "]" if kind == "[" else "}"
    check_config(prefix + ('{"hidden_size": ' + kind * depth + "1" + closing * depth + "}").encode())


@given(data=st.binary(max_size=500))
def test_random_bytes(data):
    check_config(data)


@given(number=st.floats(min_value=0, allow_nan=False) | st.integers(0, 10**500),
       unit=st.sampled_from("KMBTkmbt"))
def test_bare_sizes(number, unit):
    outcome = bounded(lambda: estimate(load_model(f"{number}{unit}")), (ConfigError,))
    if outcome.error is None:
        assert math.isfinite(outcome.value.required_gib_per_gpu)
