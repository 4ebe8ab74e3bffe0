"""The job file loader (in process): round trip, durations, ${VAR} expansion, tiers,
error positions, and the machine settings that do not belong in a job file."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from ephemera.errors import ConfigError
from ephemera.spec.durations import format_duration, parse_duration
from ephemera.spec.jobfile import JobFileError, deep_merge, load_job

BASE = """\
name: smoke
model:
  id: org/model
image: vllm/vllm-openai:v0.6.0
suite:
  command: pytest -q
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path, **kwargs) -> list:
    with pytest.raises(JobFileError) as info:
        load_job(path, **kwargs)
    assert info.value.exit_code == 2
    return info.value.problems


# ----------------------------------------------------------------------------- round trip

def test_good_file_round_trips(tmp_path: Path):
    from ruamel.yaml import YAML

    (tmp_path / "tests").mkdir()
    path = write(tmp_path, BASE + textwrap.dedent("""\
        server:
          args: ["--enforce-eager"]
          env: {VLLM_LOGGING_LEVEL: DEBUG}
          health_timeout: 90s
        artifacts: [/tmp/out]
        resources:
          provider: local
          max_price_per_hour: 2.5
          tags: {team: infra}
        env: {A: "1"}
        timeout: 1h30m
        """))
    path.write_text(path.read_text().replace("command: pytest -q", "command: pytest -q\n  files: [tests]"))
    loaded = load_job(path)
    job = loaded.job
    assert job.name == "smoke" and job.model.id == "org/model" and job.model.precision == "bf16"
    assert job.server.args == ["--enforce-eager"] and job.server.health_timeout == 90
    assert job.suite.files == ["tests"] and job.timeout == 5400
    assert job.resources.tags == {"team": "infra"} and job.resources.provider == "local"
    assert loaded.base_dir == tmp_path

    dumped = job.model_dump(mode="json")
    assert dumped["timeout"] == "1h30m" and dumped["server"]["health_timeout"] == "1m30s"
    buffer = io.StringIO()
    YAML().dump(dumped, buffer)
    again = write(tmp_path, buffer.getvalue(), "again.yaml")
    assert load_job(again).job == job


def test_line_of_a_value_is_recorded(tmp_path: Path):
    loaded = load_job(write(tmp_path, BASE))
    assert loaded.location(("suite", "command")) == (6, 12)
    assert loaded.location(("model", "id", "deeper")) == (3, 7)


# ------------------------------------------------------------------------------ durations

@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("20m", 1200), ("1h30m", 5400), ("2h", 7200), ("1h0m30s", 3630),
    ("1.5h", 5400), ("45", 45), (45, 45), (0.5, 0.5), (" 10m ", 600), ("1H", 3600),
])
def test_duration_forms(tmp_path: Path, text, seconds):
    assert parse_duration(text) == seconds
    value = f'"{text}"' if isinstance(text, str) else text
    path = write(tmp_path, BASE + f"  timeout: {value}\n")
    assert load_job(path).job.suite.timeout == seconds


@pytest.mark.parametrize("text", ["", "m", "10", "1h30", "30m1h", "1m1m", "0s", "-5", "ten minutes",
                                  "1d", "nan", True, None, float("inf"), 0])
def test_bad_durations(text):
    if text == "10":
        assert parse_duration(text) == 10   # plain seconds are allowed
        return
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (90, 1200, 5400, 3630, 7200, 1)] == \
        ["1m30s", "20m", "1h30m", "1h30s", "2h", "1s"]
    for seconds in (1, 59, 61, 3599, 3601, 86400):
        assert parse_duration(format_duration(seconds)) == seconds


def test_bad_duration_in_file_names_line_and_field(tmp_path: Path):
    path = write(tmp_path, BASE + "  timeout: 20 minutes\n")
    [problem] = problems_of(path)
    assert (problem.line, problem.column, problem.path) == (7, 12, "suite.timeout")
    assert "'20 minutes' is not a duration" in problem.message


@pytest.mark.parametrize("field, value, message", [
    ("timeout", "99999999999999999999999999h", "a duration is at most 168h (7 days)"),
    ("timeout", "169h", "a duration is at most 168h (7 days), found '169h'"),
    ("timeout", 10**40, "a duration is at most 168h (7 days)"),
    ("timeout", 604801, "a duration is at most 168h (7 days), found 604801"),
    ("timeout", 0.0001, "a duration is at least 0.001s"),
    ("server:\n  health_timeout", "200h", "at most 168h"),
    ("resources:\n  boot_timeout", "1e400", "must be a finite number"),
])
def test_durations_in_a_job_are_bounded(tmp_path: Path, field, value, message):
    path = write(tmp_path, BASE.replace("  command: pytest -q\n", "  command: pytest -q\n") + f"{field}: {value}\n")
    [problem] = problems_of(path)
    assert message in problem.message and problem.line is not None


def test_job_durations_keep_milliseconds_when_written_back():
    from ephemera.spec.durations import format_job_duration, parse_job_duration

    for seconds in (0.001, 0.5, 1.25, 59.999, 90.5, 3600.001, 7200, 604800):
        assert parse_job_duration(format_job_duration(seconds)) == seconds
    assert format_job_duration(5400.5) == "1h30m0.5s" and format_job_duration(0.25) == "0.25s"
    assert parse_job_duration(0.0015) == 0.002
    assert parse_duration("1000h") == 3_600_000   # other callers (cost --since) are not bounded


@pytest.mark.parametrize("snippet, path, bound", [
    ("server: {max_num_seqs: 10000000}", "server.max_num_seqs", "65536"),
    ("server: {tensor_parallel_size: 100000}", "server.tensor_parallel_size", "64"),
    ("resources: {disk_gib: 99999999999999999999}", "resources.disk_gib", "16000"),
    ("resources: {max_price_per_hour: .inf}", "resources.max_price_per_hour", "1000"),
    ("resources: {max_price_per_hour: 1e30}", "resources.max_price_per_hour", "1000"),
    ("resources: {ssh: {host: h, gpus: [" + ", ".join(["{}"] * 65) + "]}}", "resources.ssh.gpus", "64"),
])
def test_counts_in_a_job_are_bounded(tmp_path: Path, snippet, path, bound):
    [problem] = problems_of(write(tmp_path, BASE + snippet + "\n"))
    assert problem.path == path and bound in problem.message and problem.line == 7


def test_too_many_tiers_is_one_error_at_the_tiers_key(tmp_path: Path):
    tiers = "".join(f"  t{i}: {{}}\n" for i in range(21))
    [problem] = problems_of(write(tmp_path, BASE + "tiers:\n" + tiers))
    assert (problem.line, problem.path) == (7, "tiers") and "at most 20 tiers, found 21" in problem.message


def test_alias_expansion_is_counted(tmp_path: Path):
    from ephemera.spec.yaml_reader import MAX_VALUES

    # 12 x 1,000 = 12,000 values once *big is expanded twelve times; 1,012 as written.
    text = (BASE + "x: &big [" + ", ".join(["1"] * 1000) + "]\n"
            + "env: {" + ", ".join(f"K{i}: *big" for i in range(12)) + "}\n")
    [problem] = problems_of(write(tmp_path, text))
    assert problem.line == 8 and problem.path.startswith("env.K")
    assert f"more than {MAX_VALUES} values once alias *big is expanded" in problem.message
    assert "1001 values" in problem.message


def test_many_values_without_aliases_are_refused_too(tmp_path: Path):
    text = BASE + "  setup: [" + ", ".join(["x"] * 12_000) + "]\n"
    [problem] = problems_of(write(tmp_path, text))
    assert problem.line == 7 and "more than 10000 values" in problem.message


def test_a_recursive_alias_is_refused(tmp_path: Path):
    [problem] = problems_of(write(tmp_path, BASE + "env: &loop {A: *loop}\n"))
    assert (problem.line, problem.path) == (7, "env.A")
    assert "alias *loop refers to a value that contains it" in problem.message


def test_deep_nesting_is_refused_with_line_and_field(tmp_path: Path):
    from ephemera.spec.yaml_reader import MAX_DEPTH

    ok = BASE + "resources:\n  options:\n    a: " + "[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3) + "\n"
    assert load_job(write(tmp_path, ok), check_provider=False)
    deep = BASE + "resources:\n  options:\n" + "".join(
        "  " * (i + 2) + f"k{i}:\n" for i in range(40)) + "  " * 42 + "v: 1\n"
    [problem] = problems_of(write(tmp_path, deep))
    assert problem.path == "resources.options.k0.k1" and problem.line == 9 + MAX_DEPTH - 2
    assert f"nested deeper than {MAX_DEPTH} levels" in problem.message


def test_a_value_a_tag_cannot_convert_is_an_error_at_its_line(tmp_path: Path):
    for snippet in ("env: {A: !!bool 1}", "env: {A: !!binary 'A'}", "env: {A: !!int abc}",
                    "env: {A: !!float x}"):
        [problem] = problems_of(write(tmp_path, BASE + snippet + "\n"))
        assert problem.line == 7, snippet


def test_a_lone_surrogate_escape_is_refused(tmp_path: Path):
    [problem] = problems_of(write(tmp_path, BASE + 'env: {A: "\\ud800\\udc00"}\n'))
    assert (problem.line, problem.path) == (7, "env.A") and "UTF-16" in problem.message


def test_unusable_paths_in_suite_files_are_errors(tmp_path: Path):
    path = write(tmp_path, BASE + "  files: [" + "x" * 5000 + "]\n")
    [problem] = problems_of(path)
    assert problem.path == "suite.files.0" and "not a usable path (File name too long)" in problem.message
    assert len(problem.message) < 300


def test_many_problems_are_listed_in_full_but_printed_in_part(tmp_path: Path):
    from ephemera.spec.yaml_reader import MAX_SHOWN_PROBLEMS

    text = BASE + "".join(f"unknown{i}: 1\n" for i in range(80))
    with pytest.raises(JobFileError) as info:
        load_job(write(tmp_path, text))
    assert len(info.value.problems) == 80
    assert str(info.value).count("unknown key") == MAX_SHOWN_PROBLEMS and "... and 30 more" in str(info.value)


# -------------------------------------------------------------------------- ${VAR} expansion

def test_env_expansion(tmp_path: Path):
    path = write(tmp_path, BASE.replace("pytest -q", "pytest -k '${SELECT}' --price $$5 $${LITERAL}") + """\
env:
  HF_TOKEN: ${HF_TOKEN}
  LEVEL: ${LEVEL:-info}
  EMPTY_WITH_DEFAULT: ${EMPTY:-fallback}
  EMPTY_NO_DEFAULT: "${EMPTY}"
  TWO: "${A}-${B:-b}"
""")
    env = {"HF_TOKEN": "hf_secret", "SELECT": "smoke and not slow", "EMPTY": "", "A": "a"}
    job = load_job(path, env=env).job
    assert job.env == {"HF_TOKEN": "hf_secret", "LEVEL": "info", "EMPTY_WITH_DEFAULT": "fallback",
                       "EMPTY_NO_DEFAULT": "", "TWO": "a-b"}
    assert job.suite.command == "pytest -k 'smoke and not slow' --price $5 ${LITERAL}"


def test_env_expansion_may_not_grow_the_text_past_the_bound(tmp_path: Path):
    path = write(tmp_path, BASE + 'env:\n  A: "' + "${BIG}" * 500 + '"\n')
    with pytest.raises(JobFileError) as info:
        load_job(path, env={"BIG": "x" * 5000})        # 2.5 million characters
    [problem] = info.value.problems
    assert (problem.line, problem.path) == (8, "env.A")
    assert "more than 2000000 characters" in problem.message
    assert load_job(path, env={"BIG": "x" * 100}).job.env["A"] == "x" * 50_000


def test_env_expansion_reads_the_process_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EPHEMERA_TEST_MODEL", "org/from-env")
    path = write(tmp_path, BASE.replace("org/model", "${EPHEMERA_TEST_MODEL}"))
    assert load_job(path).job.model.id == "org/from-env"


def test_unset_variable_is_an_error_naming_it(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("EPHEMERA_TEST_UNSET", raising=False)
    path = write(tmp_path, BASE + "env:\n  TOKEN: ${EPHEMERA_TEST_UNSET}\n  OTHER: ${ALSO_UNSET}\n")
    problems = problems_of(path, env={})
    assert [(p.line, p.column, p.path) for p in problems] == [(8, 10, "env.TOKEN"), (9, 10, "env.OTHER")]
    assert "environment variable EPHEMERA_TEST_UNSET is not set" in problems[0].message
    assert "${EPHEMERA_TEST_UNSET:-default}" in problems[0].message
    assert "ALSO_UNSET" in problems[1].message
    # The rendered error names the file and line, like a compiler.
    with pytest.raises(JobFileError) as info:
        load_job(path, env={})
    assert f"{path}:8:10: env.TOKEN: environment variable EPHEMERA_TEST_UNSET" in str(info.value)


def test_secret_values_do_not_appear_in_errors(tmp_path: Path):
    path = write(tmp_path, BASE + "env:\n  TOKEN: ${TOKEN}\ngpus: 1\n")
    with pytest.raises(JobFileError) as info:
        load_job(path, env={"TOKEN": "hf_very_secret"})
    assert "hf_very_secret" not in str(info.value)


# ----------------------------------------------------------------------------------- tiers

def test_deep_merge_maps_merge_lists_replace():
    base = {"a": {"x": 1, "y": [1, 2], "z": {"k": 1}}, "b": [1], "c": 1}
    over = {"a": {"y": [3], "z": {"j": 2}}, "b": [], "d": {"n": 1}}
    merged = deep_merge(base, over)
    assert merged == {"a": {"x": 1, "y": [3], "z": {"k": 1, "j": 2}}, "b": [], "c": 1, "d": {"n": 1}}
    assert base["a"]["z"] == {"k": 1}, "the base is not modified"


TIERED = BASE.replace("pytest -q", "pytest -q\n  setup: [pip install pytest]") + """\
server:
  args: [--enforce-eager, --dtype, bfloat16]
  port: 8100
tiers:
  nightly:
    model:
      max_model_len: 32768
    server:
      args: [--max-num-seqs, "4"]
    resources:
      spot: true
  smoke: {}
"""


def test_tier_deep_merges(tmp_path: Path):
    path = write(tmp_path, TIERED)
    base = load_job(path).job
    nightly = load_job(path, tier="nightly").job
    assert base.model.max_model_len == 4096 and nightly.model.max_model_len == 32768
    assert nightly.model.id == "org/model"                       # maps merge
    assert nightly.server.args == ["--max-num-seqs", "4"]        # lists replace
    assert nightly.server.port == 8100
    assert nightly.resources.spot is True and base.resources.spot is False
    assert load_job(path, tier="smoke").job.model_dump(exclude={"tiers"}) == \
        base.model_dump(exclude={"tiers"})


def test_unknown_tier_lists_available_ones(tmp_path: Path):
    path = write(tmp_path, TIERED)
    [problem] = problems_of(path, tier="weekly")
    assert problem.message == "unknown tier 'weekly' (available: nightly, smoke)"
    assert (problem.line, problem.path) == (11, "tiers")


def test_error_inside_a_tier_points_at_the_tier_line(tmp_path: Path):
    path = write(tmp_path, TIERED.replace("max_model_len: 32768", "max_model_len: long"))
    [problem] = problems_of(path, tier="nightly")
    assert (problem.line, problem.column, problem.path) == (14, 22, "model.max_model_len")
    # Checking the base also checks every tier, and says which tier is wrong.
    [problem] = problems_of(path)
    assert (problem.line, problem.path) == (14, "[tier nightly] model.max_model_len")
    # ...unless asked not to.
    assert load_job(path, check_all_tiers=False).job.model.max_model_len == 4096


def test_unknown_key_inside_a_tier(tmp_path: Path):
    path = write(tmp_path, TIERED.replace("spot: true", "spots: true"))
    [problem] = problems_of(path, tier="nightly")
    assert (problem.line, problem.column, problem.path) == (18, 7, "resources.spots")
    assert "unknown key 'spots'" in problem.message and "spot_fallback" in problem.message


def test_tier_cannot_define_tiers(tmp_path: Path):
    path = write(tmp_path, TIERED.replace("  smoke: {}", "  smoke:\n    tiers: {x: {}}"))
    problems = problems_of(path, tier="smoke")
    assert any(p.path == "tiers.smoke.tiers" and p.line == 20 for p in problems), problems


# -------------------------------------------------------------------------- many errors

def test_all_errors_at_once_with_line_and_column(tmp_path: Path):
    path = write(tmp_path, """\
        name: smoke
        model:
          id: org/model
          max_model_len: -1
        image: 42
        server:
          port: http
          colour: blue
        suite:
          timeout: 5x
        resources:
          provider: nowhere
        """)
    problems = problems_of(path)
    got = [(p.line, p.column, p.path) for p in problems]
    assert got == [(4, 18, "model.max_model_len"), (5, 8, "image"), (7, 9, "server.port"),
                   (8, 3, "server.colour"), (9, 1, "suite.command"), (10, 12, "suite.timeout")]
    assert "found an integer 42" in problems[1].message
    assert problems[4].message == "required field is missing"
    # The provider is checked only once the schema holds; it is then reported too.
    fixed = path.read_text().replace("-1", "1").replace("42", "img").replace("http", "80")
    fixed = fixed.replace("  colour: blue\n", "").replace("timeout: 5x", "command: c")
    path.write_text(fixed)
    [problem] = problems_of(path)
    assert problem.path == "resources.provider" and problem.line == 11
    assert "registered: aws, docker, local, slurm, ssh" in problem.message


def test_unknown_provider_is_not_checked_when_asked(tmp_path: Path):
    path = write(tmp_path, BASE + "resources:\n  provider: my-plugin\n")
    assert load_job(path, check_provider=False).job.resources.provider == "my-plugin"


# ---------------------------------------------------------------------------- settings

def test_settings_from_environment(monkeypatch):
    from ephemera.spec.settings import get_settings, reset_settings

    monkeypatch.setenv("EPHEMERA_DEFAULT_PROVIDER", "docker")
    monkeypatch.setenv("EPHEMERA_SSH_PORT", "2222")
    monkeypatch.setenv("EPHEMERA_AWS_REGIONS", '["us-east-1", "eu-west-1"]')
    reset_settings()
    settings = get_settings()
    assert settings.default_provider == "docker"
    assert settings.ssh_port == 2222
    assert settings.aws_regions == ["us-east-1", "eu-west-1"]
    assert settings.history_path == settings.data_dir / "history.sqlite3"


def test_settings_from_toml_file_with_environment_winning(tmp_path: Path, monkeypatch):
    from ephemera.spec.settings import get_settings, reset_settings

    config = tmp_path / "config.toml"
    config.write_text('default_provider = "aws"\naws_region = "us-west-2"\nssh_port = 2200\n'
                      'aws_regions = ["us-west-2"]\n')
    monkeypatch.setenv("EPHEMERA_CONFIG", str(config))
    monkeypatch.delenv("EPHEMERA_DEFAULT_PROVIDER", raising=False)
    monkeypatch.delenv("EPHEMERA_AWS_REGION", raising=False)
    monkeypatch.setenv("EPHEMERA_SSH_PORT", "2201")
    reset_settings()
    settings = get_settings()
    assert settings.default_provider == "aws"
    assert settings.aws_region == "us-west-2"
    assert settings.aws_regions == ["us-west-2"]
    assert settings.ssh_port == 2201          # environment beats the file

    monkeypatch.setenv("EPHEMERA_DEFAULT_PROVIDER", "ssh")
    reset_settings()
    assert get_settings().default_provider == "ssh"


@pytest.mark.parametrize("content, env, named", [
    ("ssh_port = \"twenty\"\n", {}, "EPHEMERA_SSH_PORT"),
    ("colour = \"blue\"\n", {}, "EPHEMERA_COLOUR"),
    ("", {"EPHEMERA_SSH_PORT": "x"}, "EPHEMERA_SSH_PORT"),
])
def test_bad_settings_are_a_config_error_naming_the_setting(tmp_path: Path, monkeypatch, content, env, named):
    from ephemera.spec.settings import get_settings, reset_settings

    config = tmp_path / "config.toml"
    config.write_text(content)
    monkeypatch.setenv("EPHEMERA_CONFIG", str(config))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    with pytest.raises(ConfigError) as info:
        get_settings()
    assert named in str(info.value) and str(config) in str(info.value)
    assert info.value.exit_code == 2


def test_expanded_secret_is_not_quoted_in_a_type_error(tmp_path: Path):
    path = write(tmp_path, BASE + "server:\n  port: ${PORT_SECRET}\n"
                 "tiers:\n  big:\n    server: {max_num_seqs: '${PORT_SECRET}'}\n")
    with pytest.raises(JobFileError) as info:
        load_job(path, env={"PORT_SECRET": "hf_very_secret"})
    text = str(info.value)
    assert "hf_very_secret" not in text
    assert f"{path}:8:9: server.port:" in text and "'${PORT_SECRET}'" in text
    assert "[tier big] server.max_num_seqs" in text
