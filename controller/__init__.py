"""leasectl: a declarative, state-reconciling lease controller for Daytona sandboxes.

The package holds the program (CLI, daemon, reconciler, providers); the SQL models live in the
sibling package ``models`` and the Alembic migrations in ``migrations/`` (a wheel carries a copy;
see ``controller/resources.py``).
"""

__version__ = "0.1.0"
