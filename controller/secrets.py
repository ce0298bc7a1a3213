"""Secrets by reference: an env value written as ``{from_env: NAME}`` or ``{from_file: /path}``.

The lease row (and so ``export``, ``get``, the spec hash and every event) holds only the reference;
the value is read by the process that creates the sandbox, at create time (the applier calls
:func:`resolve` right before the create, before the create attempt is recorded), and travels only in
the create request. A reference that cannot be resolved is a :class:`SecretError` whose message names
the variable and the reference, never a value; the lease waits in phase ``Blocked`` with it and no
sandbox is created without the secret. Pure apart from reading the environment and files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REF_KEYS = ("from_env", "from_file")
MAX_SECRET_BYTES = 32768


class SecretError(Exception):
    """A reference that cannot be resolved; the message never contains a secret value."""


def is_ref(value: Any) -> bool:
    """Whether an env value is a reference (a mapping with exactly one of ``REF_KEYS``)."""
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in REF_KEYS


def check_ref(value: Any) -> str | None:
    """The problem with an env value that is not a string, or None when it is a valid reference."""
    if not isinstance(value, Mapping):
        return "must be a string or a reference ({from_env: NAME} or {from_file: /path})"
    if not is_ref(value):
        keys = ", ".join(sorted(map(str, value))) or "none"
        return f"a reference has exactly one key, from_env or from_file (got {keys})"
    kind, target = next(iter(value.items()))
    if not isinstance(target, str) or not target or "\x00" in target:
        return f"{kind} must be a non-empty string"
    if kind == "from_file" and not target.startswith("/"):
        return f"from_file must be an absolute path, got {target!r}"
    return None


def describe(ref: Mapping[str, str]) -> str:
    kind, target = next(iter(ref.items()))
    return f"{kind} {target}"


def resolve_one(key: str, ref: Mapping[str, str], environ: Mapping[str, str] | None = None) -> str:
    kind, target = next(iter(ref.items()))
    if kind == "from_env":
        value = (os.environ if environ is None else environ).get(target)
        if value is None:
            raise SecretError(f"env.{key}: from_env {target} is not set in the controller's environment")
        return value
    try:
        data = Path(target).read_bytes()
    except OSError as exc:
        raise SecretError(
            f"env.{key}: from_file {target} cannot be read: {exc.strerror or type(exc).__name__}"
        ) from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"env.{key}: from_file {target} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"env.{key}: from_file {target} is not UTF-8 text") from None
    if "\x00" in text:
        raise SecretError(f"env.{key}: from_file {target} contains a NUL character")
    # Mounted secrets usually end with one newline that is not part of the value.
    return text[:-1] if text.endswith("\n") else text


def resolve(
    refs: Mapping[str, Mapping[str, str]], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Every reference's value; the first that fails raises :class:`SecretError`."""
    return {key: resolve_one(key, ref, environ) for key, ref in sorted(refs.items())}


def resolvable_values(refs: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The values that can be resolved now (for redaction; failures are skipped)."""
    values = []
    for key, ref in refs.items():
        try:
            values.append(resolve_one(key, ref))
        except SecretError:
            continue
    return values
