"""Secrets from files (`PACRECON_<NAME>_FILE`): systemd credentials and Kubernetes Secrets."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from pacrecon.settings import ConfigurationError, load_settings
from tests.conftest import migrated_sqlite_url
from tests.daemon import Daemon, clean_environment, pacrecon
from tests.webhooks import TEST_SECRET, envelope, sign

TOKEN = "tok_from_a_file_do_not_log_77"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no .env of the repository's
    for name in [n for n in os.environ if n.startswith("PACRECON_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_each_secret_comes_from_its_file_without_the_trailing_newline(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("PACRECON_API_TOKEN_FILE", write(tmp_path / "api_token", TOKEN + "\n"))
    env.setenv("PACRECON_PACSPACE_API_KEY_FILE", write(tmp_path / "key", "sk_file\r\n"))
    env.setenv("PACRECON_DATABASE_URL_FILE", write(tmp_path / "db", "postgresql://u:pw@db/ledger\n"))
    env.setenv("PACRECON_WEBHOOK_SECRETS_FILE", write(tmp_path / "webhook", "whsec_current\nwhsec_previous\n"))
    settings = load_settings()
    assert settings.api_token is not None and settings.api_token.get_secret_value() == TOKEN
    assert settings.pacspace_api_key is not None and settings.pacspace_api_key.get_secret_value() == "sk_file"
    assert settings.database_url == "postgresql://u:pw@db/ledger"
    assert [s.get_secret_value() for s in settings.webhook_secrets] == ["whsec_current", "whsec_previous"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        (b"\xff\xfe", "is not UTF-8"),
        ("x" * 70_000, "larger than"),
    ],
)
def test_a_bad_secret_file_is_one_clear_line(env: pytest.MonkeyPatch, tmp_path: Path, content: str | bytes | None, expected: str) -> None:
    path = tmp_path / "token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    env.setenv("PACRECON_API_TOKEN_FILE", str(path))
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert str(caught.value).startswith("PACRECON_API_TOKEN_FILE: ") and expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_secret_set_twice_is_refused_without_showing_it(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("PACRECON_API_TOKEN", TOKEN)
    env.setenv("PACRECON_API_TOKEN_FILE", write(tmp_path / "token", "other_value_secret"))
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "PACRECON_API_TOKEN and PACRECON_API_TOKEN_FILE are both set" in str(caught.value)
    assert TOKEN not in str(caught.value) and "other_value_secret" not in str(caught.value)


def test_only_secrets_come_from_files(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("PACRECON_PORT_FILE", write(tmp_path / "port", "9999"))
    assert load_settings().port == 8080


def test_the_command_line_refuses_a_missing_secret_file_with_exit_2(tmp_path: Path) -> None:
    env = clean_environment(PACRECON_WEBHOOK_SECRETS_FILE=str(tmp_path / "absent"))
    done = pacrecon(["migrate"], env, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"pacrecon: configuration error: PACRECON_WEBHOOK_SECRETS_FILE: cannot read '{tmp_path / 'absent'}' (No such file or directory)"


def test_serve_with_systemd_credentials(tmp_path: Path) -> None:
    """As under `LoadCredential=`: the unit points each *_FILE at %d/NAME (the credentials
    directory); the daemon verifies webhooks with the secret from the file and never logs it."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "webhook_secrets", TEST_SECRET + "\n")
    write(credentials / "api_token", TOKEN + "\n")
    daemon = Daemon(migrated_sqlite_url(tmp_path / "ledger.db"), tmp_path, CREDENTIALS_DIRECTORY=str(credentials),
                    PACRECON_WEBHOOK_SECRETS_FILE=str(credentials / "webhook_secrets"),
                    PACRECON_API_TOKEN_FILE=str(credentials / "api_token"))
    del daemon.env["PACRECON_WEBHOOK_SECRETS"]
    daemon.start()
    try:
        webhook = sign(envelope())
        answer = httpx.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers, timeout=10)
        assert answer.json() == {"status": "recorded"}
        wrong_token = httpx.get(f"{daemon.url}/v1/deltas/1", headers={"Authorization": "Bearer " + TOKEN[:-1]}, timeout=10)
        right_token = httpx.get(f"{daemon.url}/v1/deltas/1", headers={"Authorization": "Bearer " + TOKEN}, timeout=10)
        assert wrong_token.status_code == 401 and right_token.status_code == 404  # the token from the file is the one
    finally:
        assert daemon.stop() == 0
    assert TOKEN not in daemon.log_text() and TEST_SECRET not in daemon.log_text()
