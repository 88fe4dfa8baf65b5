from fractions import Fraction

import pytest
from hypothesis import given, strategies as st

from verikit.certify.eps import format_eps, parse_eps_list, parse_eps_value
from verikit.errors import VerikitError


@pytest.mark.parametrize("text,value", [("0.1", 0.1), ("8/255", 8 / 255), (" 2/255 ", 2 / 255), ("0", 0.0),
                                        ("1e-2", 0.01), ("0.5/2", 0.25)])
def test_single_values(text, value):
    assert parse_eps_value(text) == pytest.approx(value, rel=1e-15, abs=0)


def test_comma_list_keeps_order_and_drops_duplicates():
    assert parse_eps_list("1/255,2/255, 8/255,2/255") == [1 / 255, 2 / 255, 8 / 255]


@pytest.mark.parametrize("bad", ["-1", "abc", "1/0", "", "  ", "1,,2", "nan", "inf", "-1/255", "1/2/3", "0x10"])
def test_bad_values_are_rejected(bad):
    with pytest.raises(VerikitError):
        parse_eps_list(bad)


def test_error_names_the_bad_part():
    with pytest.raises(VerikitError, match="'abc'"):
        parse_eps_list("0.1,abc")


@given(st.integers(0, 1000), st.integers(1, 1000))
def test_fractions_are_exact_divisions(n, d):
    assert parse_eps_value(f"{n}/{d}") == n / d


@given(st.integers(1, 255))
def test_format_round_trips_multiples_of_1_255(k):
    text = format_eps(k / 255)
    assert parse_eps_value(text) == k / 255  # exactly
    # k/255, unless a decimal of at most 3 significant digits is the same number (51/255 is 0.2)
    assert text == f"{k}/255" or (len(text.lstrip("0.").replace(".", "")) <= 3 and "/" not in text)


def test_short_decimals_are_not_shown_as_fractions():
    assert format_eps(0.2) == "0.2" and format_eps(51 / 255) == "0.2" and format_eps(1.0) == "1"
    assert format_eps(8 / 255) == "8/255" and format_eps(2 / 255) == "2/255"
    assert format_eps(-0.0) == "0" and parse_eps_value("-0") == 0 and str(parse_eps_value("-0")) == "0.0"


def test_format_other_values_as_decimals():
    assert format_eps(0.1) == "0.1"
    assert format_eps(0.0) == "0"
    assert Fraction(format_eps(0.3)) == Fraction("0.3")
