"""The job file loader on hostile input: every file ends in a valid job or a
JobFileError (exit 2) within the time and memory bounds of tests/hostile.py.

First the three cases found by hand, through the real command line; then properties
over generated files: random documents, mutated YAML text, alias chains, deep
nesting, tags, huge scalars, encodings, byte-order marks and NUL bytes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ephemera.spec.durations import MAX_JOB_SECONDS
from ephemera.spec.job import Job
from ephemera.spec.jobfile import JobFileError, load_job
from ephemera.spec.yaml_reader import MAX_DEPTH, MAX_VALUES
from tests.hostile import MB, bounded, run_measured

BASE_TEXT = """\
name: smoke
model:
  id: org/model
  max_model_len: 2048
image: vllm/vllm-openai:v0.6.0
server:
  args: ["--enforce-eager"]
  env: {VLLM_LOGGING_LEVEL: INFO}
suite:
  command: pytest -q
  setup: [pip install pytest]
  timeout: 20m
resources:
  provider: local
  tags: {team: infra}
env: {A: "1"}
timeout: 1h30m
tiers:
  big:
    model: {max_model_len: 8192}
    resources: {spot: true}
"""
BASE = {"name": "smoke", "model": {"id": "org/model"}, "image": "vllm/vllm-openai",
        "suite": {"command": "pytest -q"}}

# Field paths a hostile value is put at (a mapping key of None means "a new key here").
FIELDS = [("name",), ("model", "id"), ("model", "max_model_len"), ("model", "precision"),
          ("server", "args"), ("server", "env"), ("server", "port"), ("server", "max_num_seqs"),
          ("server", "tensor_parallel_size"), ("server", "health_timeout"),
          ("server", "gpu_memory_utilization"), ("suite", "setup"), ("suite", "timeout"),
          ("suite", "files"), ("resources", "max_price_per_hour"), ("resources", "disk_gib"),
          ("resources", "boot_timeout"), ("resources", "options"), ("resources", "ssh"),
          ("env",), ("timeout",), ("tiers",), ("tiers", "big"), ("artifacts",), (None,)]

WORKDIR = Path(tempfile.mkdtemp(prefix="ephemera-hostile-jobfile-"))


def check_loaded(data: bytes) -> None:
    """The property: a valid job whose numbers are within the schema's bounds, or a
    JobFileError whose message names the file (and a line inside it, when it has one)."""
    path = WORKDIR / "job.yaml"
    path.write_bytes(data)
    outcome = bounded(lambda: load_job(path, check_provider=False), (JobFileError,))
    if outcome.error is not None:
        error = outcome.error
        assert error.exit_code == 2 and error.problems
        assert str(error).startswith(str(path))
        lines = data.count(b"\n") + 2
        for problem in error.problems:
            assert problem.line is None or 1 <= problem.line <= lines, problem
            assert problem.message and len(problem.render(str(path))) < 2000
        return
    job = outcome.value.job
    assert isinstance(job, Job)
    for seconds in (job.timeout, job.suite.timeout, job.server.health_timeout,
                    job.resources.boot_timeout):
        assert 0.001 <= seconds <= MAX_JOB_SECONDS
    assert Job.model_validate(job.model_dump(mode="json")) == job


# ----------------------------------------------------------------------------- found cases

def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: width**levels
    values once expanded (43 million for 9 x 9)."""
    lines = ["name: smoke", "model:", "  id: org/model", "image: vllm/vllm-openai",
             "suite:", "  command: pytest", "  setup:", '    - &l0 "x"']
    for level in range(1, levels + 1):
        lines.append(f"    - &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def validate_measured(tmp_path: Path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    result = run_measured([sys.executable, "-m", "ephemera", "validate", path], timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert result.wall_seconds < 2.0, f"took {result.wall_seconds:.2f}s"
    assert result.max_rss_bytes < 200 * MB, f"used {result.max_rss_bytes / MB:.0f} MB"
    return path, result


def test_alias_bomb_is_refused_where_it_goes_over_the_limit(tmp_path: Path):
    path, result = validate_measured(tmp_path, alias_bomb())
    # 9**5 values: the alias *l4 inside the sixth setup item (line 13) passes 10,000.
    assert f"{path}:13:" in result.stderr
    assert "suite.setup.5" in result.stderr and "alias *l4" in result.stderr
    assert f"more than {MAX_VALUES} values" in result.stderr


def test_deep_nesting_is_refused_with_its_line(tmp_path: Path):
    depth = 50_000
    text = ("name: smoke\nmodel:\n  id: org/model\nimage: x\nsuite:\n  command: pytest\n"
            "env: {A: " + "[" * depth + "]" * depth + "}\n")
    path, result = validate_measured(tmp_path, text)
    assert f"{path}:7:" in result.stderr and "env.A" in result.stderr
    assert f"nested deeper than {MAX_DEPTH} levels" in result.stderr


def test_huge_deadline_is_refused_naming_the_bound(tmp_path: Path):
    text = ("name: smoke\nmodel:\n  id: org/model\nimage: x\nsuite:\n  command: pytest\n"
            "timeout: 99999999999999999999999999h\n")
    path, result = validate_measured(tmp_path, text)
    assert f"{path}:7:10: timeout: a duration is at most 168h (7 days)" in result.stderr


# ----------------------------------------------------------------------------- strategies

def _leaf() -> st.SearchStrategy:
    return st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
        st.sampled_from(["99999999999999999999999999h", "1e400", "-1", "0", "0s", "1h1h",
                         "${HOME}", "${UNSET_EPHEMERA_VAR}", "$$", "${", "10**30", "nan",
                         "org/model", "bf16", "90s", "ephemera/tiny-llama", "a" * 5000]),
    )


VALUES = st.recursive(_leaf(), lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=30)


def _put(doc: dict, path: tuple, value) -> dict:
    doc = json.loads(json.dumps(doc))
    node = doc
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1] if path[-1] is not None else "extra_key"] = value
    return doc


SNIPPETS = ["&a ", "*a", "*zz", "<<: *a\n", "!!python/object:os.system ", "!!binary ",
            "!!set ", "!!omap ", "!!timestamp ", "!!int ", "!!float ", "!custom ", "? ",
            "[", "]", "{", "}", ": ", ", ", "- ", "|\n", ">-\n", "#", "'", '"', "\\", "\t",
            "\n", "\n  ", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "@", "`",
            "\x00", "\ufeff", "\u2028", "\x85", "\U0001f600", "é", "9" * 5000, "1e999",
            "0x" + "f" * 40, "0o" + "7" * 40, "2020-13-45", "2001-12-14t21:59:43.10-05:00",
            "${X}", "~", "!!null ", "!!str ", "!!bool yes", ".inf", ".nan"]


@st.composite
def mutated_text(draw) -> str:
    text = draw(st.sampled_from([BASE_TEXT, json.dumps(BASE), json.dumps(BASE, indent=1)]))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "duplicate", "swap"]))
        if kind == "insert":
            text = text[:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=8)) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 30)):]
        elif kind == "duplicate":
            text = text[:at] + text[at:at + draw(st.integers(1, 200))] + text[at:]
        else:
            other = draw(st.integers(0, len(text)))
            a, b = sorted((at, other))
            text = text[b:] + text[a:b] + text[:a]
    return text


# ----------------------------------------------------------------------------- properties

@given(path=st.sampled_from(FIELDS), value=VALUES)
def test_random_documents(path, value):
    check_loaded(json.dumps(_put(BASE, path, value)).encode())


@given(text=mutated_text())
def test_mutated_yaml(text):
    check_loaded(text.encode("utf-8", errors="surrogatepass"))


@given(width=st.integers(1, 12), levels=st.integers(1, 10), merge=st.booleans(),
       field=st.sampled_from(["setup", "files", "env"]))
def test_alias_chains(width, levels, merge, field):
    lines = ["name: smoke", "model: {id: org/model}", "image: x",
             "suite:", "  command: pytest"]
    if field == "env":
        lines.append('  env: &m0 {K: "v"}')
        for level in range(1, levels + 1):
            keys = ", ".join(f"K{i}: *m{level - 1}" for i in range(width))
            lines.append(f"  e{level}: &m{level} {{{'<<: *m0, ' if merge else ''}{keys}}}")
    else:
        lines.append(f"  {field}:")
        lines.append('    - &l0 "x"')
        for level in range(1, levels + 1):
            lines.append(f"    - &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    text = "\n".join(lines) + "\n"
    check_loaded(text.encode())
    if width**levels > 2 * MAX_VALUES:
        with pytest.raises(JobFileError, match="alias"):
            load_job(WORKDIR / "job.yaml", check_provider=False)


@given(depth=st.integers(1, 3000), style=st.sampled_from(["flow-list", "flow-map", "block-map",
                                                          "block-list", "mixed"]),
       field=st.sampled_from(["env", "resources", "tiers"]))
def test_deep_nesting(depth, style, field):
    if style == "flow-list":
        value = " " + "[" * depth + "]" * depth
    elif style == "flow-map":
        value = " " + "{a: " * depth + "1" + "}" * depth
    elif style == "mixed":
        value = " " + "[{a: " * (depth // 2) + "1" + "}]" * (depth // 2)
    elif style == "block-map":
        value = "".join("\n" + "  " * (i + 1) + "k:" for i in range(min(depth, 400))) + " 1"
    else:
        value = "".join("\n" + "  " * (i + 1) + "-" for i in range(min(depth, 400))) + " 1"
    text = f"name: smoke\nmodel: {{id: org/model}}\nimage: x\nsuite: {{command: c}}\n{field}:{value}\n"
    check_loaded(text.encode())
    if depth > MAX_DEPTH + 2 and style != "mixed":
        with pytest.raises(JobFileError, match="nested deeper") as info:
            load_job(WORKDIR / "job.yaml", check_provider=False)
        assert info.value.problems[0].line is not None


TAGS = ["", "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!binary ", "!!timestamp ",
        "!!set ", "!!omap ", "!!pairs ", "!!seq ", "!!map ", "!!python/object/apply:os.system ",
        "!!python/name:os.system ", "!custom ", "!<tag:yaml.org,2002:int> ", "!e!x "]
SCALARS = ["1", "-1", "0", "1e400", "-.inf", ".nan", "0x" + "f" * 64, "9" * 5000,
           "1_000", "0b1010", "0o17", "017", "2001-12-14", "2020-13-45", "12:30:45",
           "yes", "off", "~", "[1, 2]", "{a: 1}", "AAAA", "!!!", "'quoted'", '"a\\x00b"',
           '"\\U0010ffff"', '"\\ud800"', "|\n    block"]


@given(tag=st.sampled_from(TAGS), scalar=st.sampled_from(SCALARS),
       path=st.sampled_from(FIELDS[:-1]))
def test_tags(tag, scalar, path):
    doc = _put(BASE, path, "@@VALUE@@")
    text = json.dumps(doc, indent=1).replace('"@@VALUE@@"', tag + scalar)
    check_loaded(text.encode())


SIZES = st.integers(0, 1_100_000) | st.sampled_from([900_000, 999_900, 1_000_001, 1_100_000])


@given(size=SIZES, quoting=st.sampled_from(["plain", "'", '"', "|"]),
       char=st.sampled_from(["x", "9", " ", "é", "\\", "'"]),
       field=st.sampled_from(["name", "image", "env", "suite", "timeout"]))
def test_huge_scalars(size, quoting, char, field):
    body = char * size
    if quoting == "|":
        value = "|\n  " + body
    elif quoting == "plain":
        value = body
    else:
        value = quoting + body.replace(quoting, quoting * 2 if quoting == "'" else "\\" + quoting) + quoting
    text = f"name: smoke\nmodel: {{id: org/model}}\nimage: x\nsuite: {{command: c}}\n{field}: {value}\n"
    check_loaded(text.encode())


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1",
             "cp1252", "shift_jis"]


@given(encoding=st.sampled_from(ENCODINGS), extra=st.sampled_from(["", "é", "名前", "\U0001f600"]),
       nuls=st.lists(st.integers(0, 400), max_size=3), bom=st.sampled_from([b"", b"\xef\xbb\xbf",
                                                                             b"\xff\xfe", b"\xfe\xff"]))
def test_encodings(encoding, extra, nuls, bom):
    text = BASE_TEXT.replace("infra", "infra" + extra)
    data = bom + text.encode(encoding, errors="replace")
    for at in nuls:
        data = data[:at] + b"\x00" + data[at:]
    check_loaded(data)


@given(data=st.binary(max_size=2000))
def test_random_bytes(data):
    check_loaded(data)
