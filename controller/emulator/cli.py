"""The ``leasectl local-daytona`` command: flags -> EmulatorConfig -> ``server.run``.

Registered by the main CLI as ``app.command("local-daytona")(local_daytona)``; also run by
``python -m controller.emulator``. Without ``--api-key`` the key comes from ``DAYTONA_API_KEY`` or
is generated and printed once (the key is never logged).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

import typer

from .faults import FAIL_KINDS, FaultSettings, validate


def _pairs(values: list[str], flag: str) -> dict[str, float]:
    result: dict[str, float] = {}
    for item in values:
        key, sep, number = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{flag} expects OP=NUMBER, got {item!r}")
        try:
            result[key.strip()] = float(number)
        except ValueError:
            raise typer.BadParameter(f"{flag}: {number!r} is not a number") from None
    return result


def build_faults(
    latency: list[str],
    transition: list[str],
    fail_rate: list[str],
    sandbox_error: list[str],
    stuck_starting: list[str],
    error_recoverable: bool,
    list_lag: float,
    quota: int | None,
    retry_after: int,
    hang_seconds: float,
    seed: int | None,
    **scalars: float | int | None,
) -> FaultSettings:
    """Fault settings from CLI flag values (``--fail-rate OP:KIND=P``, the maps ``OP=NUMBER``).

    ``scalars`` are the other settings by their FaultSettings name (``None``: the default).
    """
    rates: dict[str, dict[str, float]] = {}
    for key, probability in _pairs(fail_rate, "--fail-rate").items():
        op, sep, kind = key.partition(":")
        if not sep or kind not in FAIL_KINDS:
            raise typer.BadParameter(f"--fail-rate expects OP:KIND=P with KIND in {'/'.join(FAIL_KINDS)}")
        rates.setdefault(op, {})[kind] = probability
    try:
        return validate(
            {
                "latency": _pairs(latency, "--latency"),
                "transition_latency": _pairs(transition, "--transition-latency"),
                "fail_rate": rates,
                "sandbox_error": _pairs(sandbox_error, "--sandbox-error"),
                "stuck_starting": _pairs(stuck_starting, "--stuck-starting"),
                "error_recoverable": error_recoverable,
                "list_lag": list_lag,
                "quota": quota,
                "retry_after": retry_after,
                "hang_seconds": hang_seconds,
                "seed": seed,
                **{key: value for key, value in scalars.items() if value is not None},
            }
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def local_daytona(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(3986, "--port", help="Port to bind (0: any free port)."),
    state_dir: Path = typer.Option(Path(".leasectl/daytona"), "--state-dir", help="Where sandboxes live."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Bearer key clients must send (else DAYTONA_API_KEY, else generated)."
    ),
    latency: list[str] = typer.Option([], "--latency", help="OP=SECONDS: delay answers of OP (* = all)."),
    transition: list[str] = typer.Option(
        [], "--transition-latency", help="OP=SECONDS: time OP spends in its transitional state."
    ),
    fail_rate: list[str] = typer.Option(
        [], "--fail-rate", help="OP:KIND=P with KIND 429, 500, 503 or timeout: fail OP with probability P."
    ),
    sandbox_error: list[str] = typer.Option(
        [], "--sandbox-error", help="OP=P: create/start/recover ends in state error with probability P."
    ),
    stuck_starting: list[str] = typer.Option(
        [], "--stuck-starting", help="OP=P: create/start/recover stays in starting for good."
    ),
    error_recoverable: bool = typer.Option(
        True, "--error-recoverable/--error-unrecoverable", help="Whether injected errors are recoverable."
    ),
    build_failed: float = typer.Option(
        0.0, "--build-failed", help="P: a create ends in state build_failed with probability P."
    ),
    no_runners: float = typer.Option(
        0.0, "--no-runners", help='P: create/start answer 400 "No available runners" with probability P.'
    ),
    list_lag: float = typer.Option(
        0.0, "--list-lag", help="The list shows sandboxes as they were SECONDS ago (also states)."
    ),
    quota: int | None = typer.Option(None, "--quota", help="Maximum number of live sandboxes (400 over it)."),
    quota_cpu: int | None = typer.Option(None, "--quota-cpu", help="Total CPUs of running sandboxes."),
    quota_memory: int | None = typer.Option(
        None, "--quota-memory", help="Total memory (GiB) of running sandboxes."
    ),
    quota_disk: int | None = typer.Option(
        None, "--quota-disk", help="Total disk (GiB) of sandboxes that are not archived."
    ),
    start_wait_seconds: float = typer.Option(
        30.0, "--start-wait-seconds", help="How long create/start/recover wait for started (server: 30)."
    ),
    time_scale: float = typer.Option(
        1.0, "--time-scale", help="Auto-stop/archive/delete minutes run F x faster (600: 15 min = 1.5 s)."
    ),
    retry_after: int = typer.Option(
        1, "--retry-after", help="Retry-After-<name> seconds sent with injected 429."
    ),
    hang_seconds: float = typer.Option(5.0, "--hang-seconds", help="How long an injected time-out hangs."),
    seed: int | None = typer.Option(None, "--seed", help="Seed the fault dice for repeatable runs."),
    verbose: bool = typer.Option(False, "--verbose", help="Log at INFO level."),
) -> None:
    """Serve a local Daytona-compatible API (a development and test tool, not an isolation boundary)."""
    faults = build_faults(
        latency,
        transition,
        fail_rate,
        sandbox_error,
        stuck_starting,
        error_recoverable,
        list_lag,
        quota,
        retry_after,
        hang_seconds,
        seed,
        build_failed=build_failed,
        no_runners=no_runners,
        quota_cpu=quota_cpu,
        quota_memory=quota_memory,
        quota_disk=quota_disk,
        start_wait_seconds=start_wait_seconds,
        time_scale=time_scale,
    )
    key = api_key or os.environ.get("DAYTONA_API_KEY")
    if not key:
        key = secrets.token_urlsafe(24)
        print(f"local-daytona generated API key: {key}", flush=True)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .server import EmulatorConfig, run  # aiohttp: only when serving

    run(
        EmulatorConfig(
            api_key=key, host=host, port=port, state_dir=state_dir, faults=faults, announce=sys.stdout
        )
    )


def main() -> None:
    typer.run(local_daytona)
