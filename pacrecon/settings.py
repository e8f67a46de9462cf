"""Configuration: `PACRECON_*` environment variables (or a `.env` file), validated once
into one frozen `Settings` object that is passed down explicitly. Each secret may come
from a file instead (`PACRECON_<NAME>_FILE`, see pacrecon.secret_files)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url

from pacrecon.secret_files import SecretFileError, SecretFilesSource

ENV_PREFIX = "PACRECON_"
# values never echoed in an error: the secrets, and the database URL (it may hold a password)
UNECHOED_FIELDS = frozenset({"webhook_secrets", "pacspace_api_key", "admin_token", "api_token", "database_url"})


class ConfigurationError(Exception):
    """One line naming each bad variable and what it should be; never a secret's value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", frozen=True, extra="ignore"
    )

    database_url: str = "sqlite:///pacrecon.db"
    webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    webhook_tolerance_seconds: int = Field(300, ge=1, le=86_400)
    max_body_bytes: int = Field(1_048_576, ge=1_024, le=64 * 1_048_576)
    pacspace_base_url: str = "https://balance-api.pacspace.io"
    pacspace_api_key: SecretStr | None = None
    admin_token: SecretStr | None = None
    api_token: SecretStr | None = None
    pacspace_timeout_seconds: float = Field(10.0, gt=0, le=300)
    outbox_retry_interval_seconds: float = Field(5.0, gt=0, le=3600)
    outbox_lease_seconds: float = Field(120.0, gt=0, le=3600)
    stale_after_seconds: int = Field(300, ge=1)
    reconcile_interval_seconds: int = Field(60, ge=1)
    stuck_after_seconds: int = Field(3600, ge=1)
    reconcile_concurrency: int = Field(8, ge=1, le=256)
    # while the daemon's webhooks are busy, a pass waits for them, for at most this share of
    # its time (0: never waits; 1: as long as they are busy, 2 s at once): reconciler.give_way.
    # None: what measured best for the database (`yield_share()`)
    reconcile_yield_share: float | None = Field(None, ge=0, le=1)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65_535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] | None = None  # None: console on a terminal, else JSON
    lock_timeout_ms: int = Field(5_000, ge=1, le=600_000)
    # "process": webhooks are written by a child process of the daemon (its own GIL: more
    # webhooks a second and a shorter tail under load, for about 60 MB more memory);
    # "thread": by the daemon's own ledger writer thread (one process). bench/RESULTS.md
    webhook_writer: Literal["thread", "process"] = "process"
    # where a reconciliation pass writes its pages: "auto", a child process for a pass of a
    # full page (200 stale deltas) or more (its own GIL: on SQLite the pass took 12-37 % less
    # time, for 77-81 MB while it runs) and the ledger's writer thread for a smaller one or when
    # the child cannot start; "process" always a child, "thread" never. pacrecon.page_writer,
    # pacrecon.app.page_writers, bench/RESULTS.md
    reconcile_writer: Literal["auto", "process", "thread"] = "auto"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        secret_files = SecretFilesSource(settings_cls, ENV_PREFIX, sorted(UNECHOED_FIELDS))
        return init_settings, env_settings, secret_files, dotenv_settings, file_secret_settings

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: Any) -> Any:
        if isinstance(value, str):
            # commas, or one secret per line (a secret file)
            parts = [part.strip() for part in re.split(r"[,\n]", value.strip())]
            if any(not part for part in parts) and value.strip():
                raise ValueError("comma-separated secrets must not be empty")
            return tuple(part for part in parts if part)
        return value

    @field_validator("pacspace_api_key", "admin_token", "api_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # an empty token must disable its routes, never match an empty "Bearer"
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("pacspace_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            raise ValueError("is not a database URL (sqlite:///path or postgresql://user@host/db)") from None
        if backend not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(f"names the backend {backend!r}; SQLite and PostgreSQL are supported")
        return value

    def yield_share(self) -> float:
        """The configured share, or the database's: on SQLite 0.5 left the webhooks ten times
        the tail of 1 and the pass no faster; on PostgreSQL (the database's work in its own
        processes) it halved the pass under load at no cost to them (bench/RESULTS.md)."""
        if self.reconcile_yield_share is not None:
            return self.reconcile_yield_share
        return 1.0 if make_url(self.database_url).get_backend_name() == "sqlite" else 0.5

    def write_deadline_seconds(self) -> float:
        """How long a caller waits for a commit before it is answered 503: room for one
        lock timeout and the commit."""
        return max(30.0, 2 * self.lock_timeout_ms / 1000 + 5)

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        values = [s.get_secret_value() for s in self.webhook_secrets]
        for token in (self.pacspace_api_key, self.admin_token, self.api_token):
            if token is not None:
                values.append(token.get_secret_value())
        values.append(make_url(self.database_url).password or "")
        return [str(v) for v in values if v]


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the configuration; `ConfigurationError` with one line otherwise."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(exc)) from None
    except SecretFileError as exc:
        raise ConfigurationError(str(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        shown = "" if field in UNECHOED_FIELDS else f" (got {str(error.get('input'))[:60]!r})"
        problems.append(f"{ENV_PREFIX}{field.upper()}: {message}{shown}")
    return "; ".join(problems)
