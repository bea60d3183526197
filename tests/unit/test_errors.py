"""ttc's error lines: one line each, whatever the message holds."""

import pytest

from ttc_lightning.errors import error_line


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("one line", "ttc: error: one line"),
        ("first\nsecond", "ttc: error: first | second"),
        ("report:\n\n  - indented\r\n  - more\n", "ttc: error: report: | - indented | - more"),
        (ValueError("a\u2028b"), "ttc: error: a | b"),
    ],
)
def test_an_error_is_one_line(message, line):
    assert error_line(message) == line
    assert len(error_line(message).splitlines()) == 1
