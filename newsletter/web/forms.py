"""Submitted forms (pure): the fields as strings, and whether a preferences POST is the
page's own complete, valid form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Form:
    """A submitted form as plain strings (repeated fields keep every value)."""

    fields: Mapping[str, list[str]]

    def get(self, name: str) -> str:
        values = self.fields.get(name)
        return values[-1] if values else ""

    def all(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))


def form_problem(form: Form, available: list[str]) -> str | None:
    """Why a preferences POST is not the page's complete, valid form, or None. The form
    always sends `name` (maybe empty) and, when the list has sections, `sections_shown`;
    `paused` comes only when ticked. A POST without them would read as "no name, not
    paused": it must change nothing rather than clear what the reader chose."""
    if "name" not in form.fields or (available and "sections_shown" not in form.fields):
        return "The form was incomplete, so nothing was saved. Reload the page and try again."
    if any(value not in ("0", "1") for value in form.all("paused")):
        return "The pause box has a value the form does not send, so nothing was saved."
    unknown = [s for s in form.all("sections") if s not in available]
    if unknown:
        return f"{unknown[0][:100]!r} is not a section of this list, so nothing was saved."
    return None
