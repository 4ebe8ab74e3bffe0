"""Settings that belong to the machine, not the job: where state, history and caches
live, the default provider, cloud region, SSH defaults.

Sources, highest first: ``EPHEMERA_*`` environment variables, then the TOML file named
by ``EPHEMERA_CONFIG`` (default ``~/.config/ephemera/config.toml``), then defaults.
"""

from __future__ import annotations

import getpass
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ephemera.errors import ConfigError

MAX_CONFIG_FILE_BYTES = 1_000_000
MAX_SETTING_CHARS = 4096
MAX_GRACE_SECONDS = 86_400.0


def _config_file() -> Path:
    env = os.environ.get("EPHEMERA_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("ephemera")) / "config.toml"


def _default_owner() -> str:
    for var in ("GITHUB_ACTOR", "USER"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


class Settings(BaseSettings):
    # An empty EPHEMERA_* variable counts as unset (its default applies).
    model_config = SettingsConfigDict(env_prefix="EPHEMERA_", extra="forbid", env_ignore_empty=True)

    state_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_state_dir("ephemera")),
        description="Run state files (what `ephemera down` reads).",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("ephemera")),
        description="Run history database and other lasting data.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_cache_dir("ephemera")),
        description="CPU environment, tiny model, model configs, price caches.",
    )
    history_db: Path | None = Field(default=None, description="Run history (SQLite); default DATA_DIR/history.sqlite3.")
    artifacts_dir: Path = Field(default=Path("ephemera-runs"), description="Where runs' artifacts are pulled to.")
    default_provider: str = Field(default="local", description="Provider when the job names none.")
    owner: str = Field(default_factory=_default_owner, description="Written into every instance's owner label.")
    expiry_grace_seconds: float = Field(default=300.0, ge=0, le=MAX_GRACE_SECONDS, description=(
        "How long past the job's deadline an instance may live before its dead-man switch ends it."))
    cache_weights: str | None = Field(default=None, description=(
        "Default for a job's cache.weights: 'auto' or a directory for the Hugging Face cache."))
    cache_compile: str | None = Field(default=None, description=(
        "Default for a job's cache.compile: 'auto', a directory, or a Docker volume name (docker)."))
    hub_python: str = Field(default="python3", description=(
        "Python with huggingface_hub on ssh/aws/slurm hosts for the weights download "
        "(without it the host gets a virtualenv of its own, else vLLM downloads)."))
    # AWS
    aws_region: str | None = Field(default=None, description="Default AWS region (else the AWS chain's).")
    aws_regions: list[str] = Field(default_factory=list, description="Regions to search/reap.")
    aws_ami: str | None = Field(default=None, description="AMI id to use instead of the Deep Learning Base AMI.")
    aws_subnet_id: str | None = None
    aws_security_group_id: str | None = None
    aws_ssh_cidr: str | None = Field(default=None, description=(
        "CIDR allowed to SSH in (default: this machine's public /32); /24 or narrower, no host "
        "bits, unless it ends with '!'."))
    aws_ssh_host_override: str | None = Field(default=None, description="Reach instances at this host[:port] (bastion forward, tests).")
    aws_use_private_ip: bool = False
    aws_bastion: str | None = Field(default=None, description="user@host[:port] to jump through.")
    aws_instance_profile: str | None = Field(default=None, pattern=(
        r"^(arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/)?[A-Za-z0-9_+=,.@/-]{1,128}$"),
        description=(
            "IAM instance profile (name or ARN) every aws instance gets (IamInstanceProfile); "
            "s3:// caches need one, its role limited to their prefix."))
    aws_boot_dir: str = Field(default="/var/lib/ephemera", pattern=r"^/[A-Za-z0-9._/+-]*$", description=(
        "Directory on an instance where the work its user-data starts at boot (image pull, "
        "weights download) writes its logs and exit status."))
    aws_host_key_wait: float = Field(default=300.0, ge=0, le=3600, description=(
        "Seconds to wait after SSH answers for the instance's host keys in its console output "
        "(then known_hosts or first-use trust decide)."))
    # SSH provider
    ssh_host: str | None = None
    ssh_port: int = Field(default=22, ge=1, le=65535)
    ssh_user: str = "root"
    ssh_key: Path | None = None
    ssh_workroot: str = Field(default="~/ephemera-runs", description=(
        "Where runs' directories are made on an ssh/aws host; '~/' is the login user's home."))
    ssh_host_key: str | None = Field(default=None, description=(
        "Host key ('TYPE BASE64') or SHA256 fingerprint the default ssh host must present."))
    ssh_bastion_host_key: str | None = Field(default=None, description=(
        "Host key or SHA256 fingerprint the bastion (aws_bastion) must present."))
    ssh_known_hosts: Path | None = Field(default=None, description=(
        "known_hosts file to trust (default: ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts)."))
    ssh_trust_first_use: bool = Field(default=False, description=(
        "Accept a host key that nothing vouches for (first-use trust; unsafe on shared networks)."))
    # Slurm provider
    slurm_login_host: str | None = Field(default=None, description=(
        "user@host[:port] of the login node to run Slurm's tools on over SSH (default: here)."))
    slurm_conf: str | None = Field(default=None, description=(
        "slurm.conf for Slurm's tools on the login side (SLURM_CONF), when not the default."))
    slurm_partition: str | None = Field(default=None, description="Partition to submit to (default: the cluster's).")
    slurm_account: str | None = Field(default=None, description="Account to charge (sbatch --account).")
    slurm_qos: str | None = Field(default=None, description="Quality of service (sbatch --qos).")
    slurm_sbatch_options: str | None = Field(default=None, description=(
        "More sbatch options, as a shell would split them (e.g. '--constraint=a100 --reservation=ci')."))
    slurm_price_per_gpu_hour: float = Field(default=0.0, ge=0, le=1000, description=(
        "Internal price of one GPU-hour, for plans and cost reports."))
    slurm_queue_timeout: float = Field(default=1800.0, gt=0, le=7 * 86_400.0, description=(
        "Seconds a job may stay PENDING before it is cancelled (not billed)."))
    slurm_workroot: str = Field(default="~/ephemera-runs/slurm", description=(
        "Runs' directories, on a file system the login side and the nodes share."))
    # Local provider
    env_allow: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Names of this machine's environment variables the local provider passes on to the "
        "server and the suite (JSON list or comma separated)."))

    @field_validator("env_allow", mode="before")
    @classmethod
    def _names_list(cls, value: Any) -> Any:
        """EPHEMERA_ENV_ALLOW is a JSON list or plain comma separated names."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"is not a JSON list: {exc}") from None
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("env_allow", mode="after")
    @classmethod
    def _env_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or "=" in name or any(c.isspace() for c in name):
                raise ValueError(f"'{name}' is not an environment variable name")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: leave the setting out to get its default")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _plain_text(cls, value: Any) -> Any:
        """Names and paths end up in file names, labels and command lines."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str | Path):
                text = str(item)
                if "\x00" in text:
                    raise ValueError("contains a NUL character")
                if len(text) > MAX_SETTING_CHARS:
                    raise ValueError(f"is {len(text)} characters long; at most {MAX_SETTING_CHARS}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_config_file()),
        )

    @property
    def history_path(self) -> Path:
        return self.history_db or (self.data_dir / "history.sqlite3")


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return Settings()


def _check_config_file(path: Path) -> None:
    """The settings file, when there is one, must be a small UTF-8 TOML document:
    say what is wrong with it (and where) before the settings library reads it."""
    import tomllib


    try:
        if not path.exists():
            return
        if not path.is_file():
            raise ConfigError(f"settings file {path} is not a file.")
        if path.stat().st_size > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(f"settings file {path} is larger than {MAX_CONFIG_FILE_BYTES} bytes.")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror or exc}.") from None
    try:
        tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"settings file {path} line {line}: not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path} is not valid TOML: {exc}.") from None
    except RecursionError:
        raise ConfigError(f"settings file {path} nests arrays or tables too deeply.") from None


def get_settings() -> Settings:
    """The settings of this process (read once). Raises ConfigError when invalid."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError


    if _cached.cache_info().currsize:
        return _cached()
    _check_config_file(_config_file())
    try:
        return _cached()
    except ValidationError as exc:
        problems = "; ".join(
            f"EPHEMERA_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings ({_config_file()} or environment): {problems}") from None
    except SettingsError as exc:  # an environment value that is not the JSON a list needs
        raise ConfigError(f"invalid settings ({_config_file()} or environment): {exc}; "
                          "a list is written as JSON, e.g. '[\"us-east-1\"]'") from None


def reset_settings() -> None:
    """Forget cached settings (tests change the environment)."""
    _cached.cache_clear()
