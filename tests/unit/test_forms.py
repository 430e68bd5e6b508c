"""A preferences POST is changed only by the page's complete, valid form."""

from __future__ import annotations

import pytest

from newsletter.web.forms import Form, form_problem

SECTIONS = ["Asia", "World"]


def form(**fields: str | list[str]) -> Form:
    return Form({k: v if isinstance(v, list) else [v] for k, v in fields.items()})


@pytest.mark.parametrize(
    ("fields", "available"),
    [
        ({"name": ""}, []),
        ({"name": "Ada", "paused": "1"}, []),
        ({"name": "Ada", "paused": "0"}, []),
        ({"name": "Ada", "paused": ["0", "1"]}, []),
        ({"name": "", "sections_shown": "1"}, SECTIONS),  # none ticked: the page says so
        ({"name": "Ada", "sections_shown": "1", "sections": ["Asia", "World"]}, SECTIONS),
        ({"name": "Ada", "sections_shown": "1", "sections": "World", "paused": "1"}, SECTIONS),
    ],
)
def test_complete_forms_pass(fields: dict[str, str | list[str]], available: list[str]) -> None:
    assert form_problem(form(**fields), available) is None


@pytest.mark.parametrize(
    ("fields", "available", "says"),
    [
        ({}, [], "incomplete"),
        ({"paused": "1"}, [], "incomplete"),
        ({"foo": "bar"}, SECTIONS, "incomplete"),
        ({"name": "Ada"}, SECTIONS, "incomplete"),  # sections_shown missing
        ({"sections_shown": "1"}, SECTIONS, "incomplete"),  # name missing
        ({"name": "Ada", "paused": "yes"}, [], "pause box"),
        ({"name": "Ada", "paused": ["1", "on"]}, [], "pause box"),
        ({"name": "Ada", "paused": ""}, [], "pause box"),
        ({"name": "Ada", "sections_shown": "1", "sections": "Europe"}, SECTIONS, "'Europe'"),
        ({"name": "Ada", "sections_shown": "1", "sections": ["World", "x"]}, SECTIONS, "'x'"),
        ({"name": "Ada", "sections": "World"}, [], "not a section"),
    ],
)
def test_incomplete_or_invalid_forms_say_why(
    fields: dict[str, str | list[str]], available: list[str], says: str
) -> None:
    problem = form_problem(form(**fields), available)
    assert problem is not None and says in problem and "nothing was saved" in problem


def test_a_long_unknown_section_is_shortened() -> None:
    problem = form_problem(form(name="A", sections_shown="1", sections="x" * 500), SECTIONS)
    assert problem is not None and "x" * 100 in problem and "x" * 101 not in problem


def test_the_last_value_of_a_field_wins_and_all_are_kept() -> None:
    f = form(name=["a", "b"])
    assert f.get("name") == "b" and f.all("name") == ["a", "b"]
    assert f.get("missing") == "" and f.all("missing") == []
