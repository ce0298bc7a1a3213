"""The project's exception tree; every error leasectl raises on purpose derives from LeasectlError.

::

    LeasectlError
    ├── ConfigError                 bad settings file or value (names the file and key)
    ├── SpecError                   invalid lease YAML (names the file, the lease and the field)
    │   └── ScriptInputError        (execution_script) an argument or env value that cannot be run
    ├── NotLeaderError              a write attempted by a replica that no longer holds leadership
    ├── SchemaError                 (db) the schema is older or newer than this leasectl knows
    ├── MissingResourceError        (resources) a file a wheel must carry is missing
    ├── ExecutionError              (execution) a command that cannot run
    │   ├── InvalidCommandError     bad command, cwd, env or stdin
    │   └── LeaseNotReadyError      unknown lease, or not Ready
    └── ProviderError               anything a sandbox provider call failed with
        ├── TransientError          worth retrying; ``retry_after`` seconds when the API said so
        │   └── RateLimitedError    HTTP 429: slows the whole controller for ``retry_after``
        ├── PermanentError          the API refuses the request as given; retrying will not help
        ├── NotFoundError           the sandbox (or file) does not exist
        └── ConflictError           a transition is in progress, or the name is taken

Providers translate vendor exceptions into these (``raise ... from exc``); nothing above the
provider layer ever sees a vendor exception.
"""

from __future__ import annotations


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


class ProviderError(LeasectlError):
    """A sandbox provider call failed."""


class TransientError(ProviderError):
    """A failure worth retrying later; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    """The API answered 429; the whole controller should slow down for ``retry_after``."""


class PermanentError(ProviderError):
    """The API refused the request as given (bad spec, quota, forbidden): do not retry as is."""


class NotFoundError(ProviderError):
    """The sandbox or file does not exist."""


class ConflictError(ProviderError):
    """A conflicting operation is in progress, or the name is already taken."""
