"""Every exit code of every ``leasectl`` command, in one place (the README's table is this one).

The CLI (``controller/cli/``) exits only with these names. ``leasectl exec`` also passes the remote
command's own status through (0-255) when the command ran to its end; the codes below that it uses
on its own (124, 125, 130, 143) are the ones coreutils ``timeout``, ``env`` and shells use, so a
script that wraps ``exec`` reads them as it would for a local command.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
"""Success. ``plan --detailed-exitcode``: no action planned."""

FAILURE: Final = 1
"""A runtime failure: a lease ended a pass in Error/Failed, a deletion failed, ``doctor`` found a
problem, the Daytona API or the database could not be reached, or an unexpected error."""

INVALID: Final = 2
"""Invalid input, nothing changed: usage, settings, a lease file, an unknown lease or execution, a
lease that cannot take the request, an unknown pool, a release of a lease that is not a claimed
pool member, or a prune refused by the guard."""

PLAN_CHANGES: Final = 2
"""``plan --detailed-exitcode`` only: actions are planned (then every error exits 1, as Terraform)."""

NOT_LEADER: Final = 3
"""``reconcile --once``, ``gc``: another replica (a running daemon) leads this instance."""

NO_DATABASE: Final = 4
"""The database does not exist, or its schema is missing or old (run ``leasectl db upgrade``) or
newer than this version knows (upgrade leasectl)."""

NO_MEMBER_READY: Final = 5
"""``claim``: no member of the pool is Ready (and, with ``--wait``, none became Ready in time)."""

TIMED_OUT: Final = 124
"""``exec``: the command ran out of its time-out and was stopped."""

SETUP_FAILED: Final = 125
"""``exec``: the command could not be started (its cwd or stdin file is unusable)."""

INTERRUPTED: Final = 130
"""Ctrl-C (SIGINT). ``exec``: the remote command was stopped (see the README for what is promised)."""

TERMINATED: Final = 143
"""SIGTERM. ``exec``: the remote command was stopped, as for Ctrl-C."""

TABLE: Final = (
    (OK, "all", "success; `plan --detailed-exitcode`: nothing to do"),
    (FAILURE, "all", "runtime failure (lease in error, deletion failed, API/database unreachable, ...)"),
    (INVALID, "all", "invalid input or request; nothing changed"),
    (PLAN_CHANGES, "plan --detailed-exitcode", "actions are planned"),
    (NOT_LEADER, "reconcile --once, gc", "another replica leads this instance"),
    (NO_DATABASE, "all", "no database, or a schema this version cannot use (missing, old or newer)"),
    (NO_MEMBER_READY, "claim", "no member of the pool is ready (within --wait)"),
    (TIMED_OUT, "exec", "the command timed out"),
    (SETUP_FAILED, "exec", "the command could not start (cwd, stdin file)"),
    (INTERRUPTED, "all; exec stops the remote command", "interrupted by Ctrl-C (SIGINT)"),
    (TERMINATED, "exec, exec --queue", "terminated by SIGTERM"),
)
"""(code, commands, meaning): what the README's exit-code table lists; a test keeps them equal."""
