"""Secrets read from files: `PACRECON_<NAME>_FILE=/path` instead of `PACRECON_<NAME>=value`.

For systemd credentials (`LoadCredential=` puts them under `$CREDENTIALS_DIRECTORY`, which a
unit names as `%d`) and Kubernetes Secrets mounted as files: the value never sits in the
process environment, where `/proc/PID/environ` and crash reports could show it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

FILE_SUFFIX = "_FILE"
MAX_SECRET_BYTES = 65_536  # a secret is short; a bigger file is the wrong file


class SecretFileError(ValueError):
    """A `*_FILE` variable that cannot be used; names the variable and the path, never the content."""


class SecretFilesSource(PydanticBaseSettingsSource):
    """The fields in `names`, each from the file its `<PREFIX><NAME>_FILE` variable points at.

    Setting both `PACRECON_X` and `PACRECON_X_FILE` is refused: which one wins would be a guess.
    The file's trailing whitespace (the newline an editor adds) is not part of the secret.
    """

    def __init__(self, settings_cls: type[BaseSettings], prefix: str, names: Iterable[str],
                 environ: Mapping[str, str] | None = None) -> None:
        super().__init__(settings_cls)
        self.prefix, self.names = prefix, tuple(names)
        source = os.environ if environ is None else environ
        self.environ = {key.upper(): value for key, value in source.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ does the work for every field at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.names:
            variable = f"{self.prefix}{name.upper()}"
            path = self.environ.get(variable + FILE_SUFFIX)
            if path is None:
                continue
            if variable in self.environ:
                raise SecretFileError(f"{variable} and {variable}{FILE_SUFFIX} are both set: set one of them")
            values[name] = read_secret_file(variable + FILE_SUFFIX, path)
        return values


def read_secret_file(variable: str, path: str) -> str:
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretFileError(f"{variable}: cannot read {path!r} ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise SecretFileError(f"{variable}: {path!r} is larger than {MAX_SECRET_BYTES} bytes; is it the right file?")
    try:
        value = raw.decode("utf-8").rstrip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{variable}: {path!r} is not UTF-8 text") from None
    if not value:
        raise SecretFileError(f"{variable}: {path!r} is empty")
    return value
