"""The value sets that live in more than one layer agree: the database CHECK constraints (models),
the YAML schema (specs) and the pure planner. models is the source the database enforces."""

from __future__ import annotations

import typing

from controller import planner, specs
from models import DESIRED_STATES, LANGUAGES, PHASES


def test_desired_states_agree() -> None:
    assert set(planner.DESIRED_STATES) == set(DESIRED_STATES)
    assert set(typing.get_args(specs.DesiredState)) == set(DESIRED_STATES)


def test_languages_agree() -> None:
    assert set(typing.get_args(specs.Language)) == set(LANGUAGES)


def test_every_planner_phase_is_allowed_by_the_database() -> None:
    planner_phases = {
        value
        for name, value in vars(planner).items()
        if name.isupper() and isinstance(value, str) and value in PHASES
    }
    named = (
        "PENDING",
        "PROVISIONING",
        "READY",
        "STOPPING",
        "STOPPED",
        "ARCHIVING",
        "ARCHIVED",
        "DELETING",
        "DELETED",
        "ERROR",
        "FAILED",
        "PAUSED",
        "BLOCKED",
        "IDLE",
    )
    assert {getattr(planner, n) for n in named} == planner_phases == set(PHASES)
