"""The per-issue markers (newsletter.placeholders): keyed, drawn clear of the content."""

from __future__ import annotations

import itertools

import pytest

from newsletter import placeholders
from newsletter.placeholders import Markers, appears_in, check_content, fold, new_markers

KEY = "0123456789abcdef0123"


def test_markers_carry_the_key_and_name_their_kind() -> None:
    markers = Markers(KEY)
    assert markers.name == f"XXNLNAME{KEY}XX"
    assert markers.unsubscribe_url == f"XXNLUNSUB{KEY}XX"
    assert markers.preferences_url == f"XXNLPREFS{KEY}XX"
    assert markers.all == (markers.name, markers.unsubscribe_url, markers.preferences_url)
    assert len(set(markers.all)) == 3


@pytest.mark.parametrize("key", ["", "0123", KEY.upper(), KEY + "0", KEY[:-1] + "g"])
def test_a_key_is_twenty_lower_case_hex_digits(key: str | None) -> None:
    with pytest.raises(ValueError, match="20 lower-case hex"):
        Markers(key)  # type: ignore[arg-type]


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown marker kind"):
        Markers(KEY).marker("EMAIL")


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("AbC", "abc"),
        ("a b-c_d.e", "abcde"),
        ("%41%62", "ab"),
        ("%2541", "a"),  # percent-encoded twice
        ("&#65;&#x62;", "ab"),
        ("&amp;#65;", "a"),  # an entity escaped once more
        ("%26%2365%3B", "a"),  # an entity, percent-encoded
        ("ＡＢ１", "ab1"),  # full-width forms are their letters (NFKC)
    ],
)
def test_fold_undoes_case_encoding_and_spacing(text: str, folded: str) -> None:
    assert fold(text) == folded


@pytest.mark.parametrize(
    "spelling",
    [
        KEY,
        KEY.upper(),
        f"XXNLUNSUB{KEY}XX".lower(),
        " ".join(KEY),
        "".join(f"%{ord(c):02X}" for c in KEY),
        "".join(f"&#{ord(c)};" for c in KEY),
        "".join(f"&#x{ord(c):x};" for c in KEY.upper()),
        f"https://evil.example/c?u={KEY}",
    ],
)
def test_the_key_is_found_in_any_spelling(spelling: str) -> None:
    assert appears_in(KEY, ["harmless", f"before {spelling} after"])
    with pytest.raises(ValueError, match="marker key"):
        check_content(Markers(KEY), ["harmless", spelling])


def test_content_without_the_key_passes() -> None:
    almost = KEY[:-1]
    assert not appears_in(KEY, [almost, "XXNLUNSUBXX", f"{almost} 4"])
    check_content(Markers(KEY), [almost, "XXNLUNSUBXX"])


def test_new_markers_skip_every_key_the_content_holds() -> None:
    first, second, third = "a" * 20, "b" * 20, "c" * 20
    drawn = iter([first, second, third])
    calls: list[int] = []

    def draw(size: int) -> str:
        calls.append(size)
        return next(drawn)

    content = [first.upper(), "".join(f"%{ord(c):02X}" for c in second)]
    markers = new_markers(content, draw=draw)
    assert markers.key == third
    assert calls == [placeholders.KEY_BYTES] * 3


def test_new_markers_are_random_per_issue() -> None:
    keys = {new_markers(["World Digest"]).key for _ in range(50)}
    assert len(keys) == 50
    assert all(placeholders.KEY_PATTERN.fullmatch(key) for key in keys)


def test_any_marker_finds_keyed_fixed_and_case_changed_markers() -> None:
    found = placeholders.ANY_MARKER.findall(
        f"a XXNLNAME{KEY}XX b xxnlunsubxx c XXNLPREFSXX d XXNLOTHERXX"
    )
    assert found == [f"XXNLNAME{KEY}XX", "xxnlunsubxx", "XXNLPREFSXX"]


def test_each_kind_has_its_own_marker_for_every_key() -> None:
    for a, b in itertools.combinations(placeholders.KINDS, 2):
        assert Markers(KEY).marker(a) != Markers(KEY).marker(b)
