"""Sandbox providers: the boundary between the controller and a sandbox platform.

``base`` defines the Protocol and dataclasses; ``daytona`` is the real implementation (the only
module importing the Daytona SDK); ``memory`` is the in-memory one for tests. :func:`build_provider`
makes the real one from settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from controller.errors import ConfigError

if TYPE_CHECKING:
    from controller.config import Settings
    from controller.providers.daytona import DaytonaProvider


def build_provider(
    settings: Settings, on_request: Callable[[str, str], None] | None = None
) -> DaytonaProvider:
    """The Daytona provider for these settings (imports the SDK lazily: it is slow to import)."""
    if settings.daytona.api_key is None:
        raise ConfigError(
            "no Daytona API key: set DAYTONA_API_KEY (or daytona.api_key in the config file); "
            "the local Daytona API of `make run` keeps its key in .leasectl/api-key"
        )
    from controller.providers.daytona import DaytonaProvider

    return DaytonaProvider(
        settings.daytona.api_url,
        settings.daytona.api_key.get_secret_value(),
        target=settings.daytona.target,
        request_timeout=settings.daytona.request_timeout_seconds,
        on_request=on_request,
    )
