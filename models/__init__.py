"""SQLAlchemy 2.x models of leasectl's database (tables, value sets, the overview view).

Imported by the controller and the migrations; imports nothing of ``controller``.
"""

from models.base import NAMING_CONVENTION, Base, UTCDateTime, metadata, utcnow
from models.tables import (
    DESIRED_STATES,
    EXECUTION_STATES,
    EXECUTION_TERMINAL_STATES,
    LANGUAGES,
    PHASES,
    ChangeCounter,
    Event,
    Execution,
    LeaderElection,
    Lease,
    LeaseStatus,
    OrphanSighting,
    Pool,
    Quota,
    Usage,
    Volume,
)
from models.views import LEASE_OVERVIEW_SQL, lease_overview

__all__ = [
    "DESIRED_STATES",
    "EXECUTION_STATES",
    "EXECUTION_TERMINAL_STATES",
    "LANGUAGES",
    "LEASE_OVERVIEW_SQL",
    "NAMING_CONVENTION",
    "PHASES",
    "Base",
    "ChangeCounter",
    "Event",
    "Execution",
    "LeaderElection",
    "Lease",
    "LeaseStatus",
    "OrphanSighting",
    "Pool",
    "Quota",
    "UTCDateTime",
    "Usage",
    "Volume",
    "lease_overview",
    "metadata",
    "utcnow",
]
