"""The project's exception tree; every error leasectl raises on purpose derives from LeasectlError.

::

    LeasectlError
    ├── ConfigError                 bad settings file or value (names the file and key)
    ├── SpecError                   invalid lease YAML (names the file, the lease and the field)
    │   └── ScriptInputError        (execution_script) an argument or env value that cannot be run
    ├── NotLeaderError              a write attempted by a replica that no longer holds leadership
    ├── SchemaError                 (db) the schema is older or newer than this leasectl knows
    ├── MissingResourceError        (resources) a file a wheel must carry is missing
    ├── VolumeNotReadyError         a volume a lease mounts is missing or not ready (phase Blocked)
    ├── ExecutionError              (execution) a command that cannot run
    │   ├── InvalidCommandError     bad command, cwd, env or stdin
    │   └── LeaseNotReadyError      unknown lease, or not Ready
    └── ProviderError               anything a sandbox provider call failed with
        ├── TransientError          worth retrying; ``retry_after`` seconds when the API said so
        │   ├── RateLimitedError    HTTP 429: pauses calls of its ``scope`` for ``retry_after``
        │   ├── NotSentError        the request never reached the server (connection refused):
        │   │                       nothing it asked for can have happened
        │   ├── AuthError           401/403: the API key is wrong or lacks a permission (suspended
        │   │                       org, region): an operator fixes it, the spec need not change
        │   ├── CapacityError       quota or capacity exhausted (Daytona: 400): clears by itself
        │   └── StartFailedError    create/start/recover waited and the sandbox fell into error;
        │                           the errored sandbox exists: look it up before anything else
        ├── PermanentError          the API refuses the request as given; only a spec change helps
        ├── NotFoundError           the sandbox (or file) does not exist
        └── ConflictError           the name is taken (create)
            └── StateConflictError  the sandbox's state refuses the call (a repeat of a change that
                                    already happened, or a change in progress): re-observe, no failure

Providers translate vendor exceptions into these (``raise ... from exc``); nothing above the
provider layer ever sees a vendor exception. Only failures of the vendor's API or of the way to it
are translated (an HTTP answer, the network, an answer that cannot be read): a programming error
(NameError, TypeError, ...) raised inside a provider call propagates unchanged, so it shows as the
bug it is instead of a transient failure retried for ever.
"""

from __future__ import annotations

from collections.abc import Mapping


class LeasectlError(Exception):
    """Base class of every error leasectl raises on purpose."""


class ConfigError(LeasectlError):
    """A settings file or value is invalid."""


class SpecError(LeasectlError):
    """A lease specification (YAML) is invalid."""


class NotLeaderError(LeasectlError):
    """This replica does not (or no longer) hold the leader lease."""


class SchemaError(LeasectlError):
    """The database schema is not the revision this leasectl was built for; says what to run."""


class MissingResourceError(LeasectlError):
    """A file leasectl ships (migrations, config.example.yaml) is not where it should be."""


class VolumeNotReadyError(LeasectlError):
    """A volume a lease mounts does not exist at Daytona or is not ready yet: the lease waits (phase
    Blocked) and no sandbox is created without it."""


class ProviderError(LeasectlError):
    """A sandbox provider call failed; ``status`` is the HTTP status of the answer, when there was one."""

    status: int | None = None


class TransientError(ProviderError):
    """A failure worth retrying later; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# Scopes of a RateLimitedError: which calls must wait (Daytona's named throttlers).
SCOPE_ALL = "all"  # ``authenticated``: every call
SCOPE_CREATE = "create"  # ``sandbox-create``
SCOPE_LIFECYCLE = "lifecycle"  # ``sandbox-lifecycle``: start, stop, archive, recover, delete, ...
RATE_LIMIT_SCOPES = (SCOPE_ALL, SCOPE_CREATE, SCOPE_LIFECYCLE)


class RateLimitedError(TransientError):
    """The API answered 429; calls of ``scope`` should wait ``retry_after`` seconds.

    ``pauses`` maps every scope the answer named to its wait (Daytona may name several throttlers);
    ``retry_after`` is the largest of them.
    """

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        scope: str = SCOPE_ALL,
        pauses: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(message, retry_after)
        self.scope = scope
        self.pauses: dict[str, float | None] = dict(pauses) if pauses else {scope: retry_after}


class NotSentError(TransientError):
    """The request never reached the server (connection refused, name not resolved): whatever it
    asked for provably did not happen."""


AUTH_HINT = "check DAYTONA_API_KEY (or the daytona.api_key setting) and the organization's access"


class AuthError(TransientError):
    """The API refused our credentials (401) or their permissions (403: suspended organization,
    missing permission, region not available).

    Transient for the reconciler: an operator fixes the key or the organization without touching a
    spec, so leases back off and retry and are never marked Failed. One-shot commands (``leasectl
    exec``) do not wait for that: they stop at the first one and say :data:`AUTH_HINT`.
    """


class CapacityError(TransientError):
    """A quota or capacity limit refused the call; it clears when capacity returns (phase Blocked)."""


class StartFailedError(TransientError):
    """The sandbox fell into ``error``/``build_failed`` while the call waited for it to start.

    The sandbox exists (under its name) although the call failed: callers look it up before
    creating again.
    """


class PermanentError(ProviderError):
    """The API refused the request as given (a spec it does not accept): only a spec change helps."""


class NotFoundError(ProviderError):
    """The sandbox or file does not exist."""


class ConflictError(ProviderError):
    """The name is already taken, or another conflicting operation is in progress."""


class StateConflictError(ConflictError):
    """The sandbox's current state refuses the call: the observation it was planned from is stale."""
