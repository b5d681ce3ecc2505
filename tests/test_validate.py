"""ftransformer.validate: each check names the argument, what it must be and what it got; bools are not ints."""

import pytest

from ftransformer import validate


def test_is_int_and_is_number_refuse_bools():
    assert validate.is_int(3) and not validate.is_int(True) and not validate.is_int(3.0)
    assert validate.is_number(3) and validate.is_number(0.5) and not validate.is_number(False)
    assert not validate.is_number("1")


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2", None])
def test_positive_int_refuses(value):
    with pytest.raises(ValueError, match=rf"n must be a positive int, got {value!r}"):
        validate.positive_int("n", value)


def test_positive_int_takes_none_only_where_allowed():
    validate.positive_int("n", 2)
    validate.positive_int("n", None, allow_none=True)
    with pytest.raises(ValueError, match="n must be a positive int or None, got 0"):
        validate.positive_int("n", 0, allow_none=True)


def test_int_at_least_and_non_negative_int():
    validate.int_at_least("k", 5, 5)
    validate.non_negative_int("k", 0)
    with pytest.raises(ValueError, match="k must be an int >= 5, got 4"):
        validate.int_at_least("k", 4, 5)
    with pytest.raises(ValueError, match="k must be an int >= 0, got False"):
        validate.non_negative_int("k", False)


def test_int_in_half_open_and_closed():
    validate.int_in("i", 0, 0, 3)
    validate.int_in("i", 3, 0, 3, closed=True)
    with pytest.raises(ValueError, match=r"i must be an int in \[0, n=3\), got 3"):
        validate.int_in("i", 3, 0, 3, high_name="n")
    with pytest.raises(ValueError, match=r"i must be an int in \[0, 3\], got 4"):
        validate.int_in("i", 4, 0, 3, closed=True)


def test_integer_names_the_type_and_takes_the_error_class():
    validate.integer("x", -4)
    with pytest.raises(ValueError, match=r"x must be an int, got 1.0 \(float\)"):
        validate.integer("x", 1.0)
    with pytest.raises(TypeError, match=r"x must be an int or None, got True \(bool\)"):
        validate.integer("x", True, allow_none=True, error=TypeError)


def test_boolean_positive_number_one_of():
    validate.boolean("flag", False)
    with pytest.raises(ValueError, match=r"flag must be a bool, got 'false' \(str\)"):
        validate.boolean("flag", "false")
    with pytest.raises(TypeError, match=r"add_bos must be true or false, got 1 \(int\)"):
        validate.boolean("add_bos", 1, expected="true or false", error=TypeError)
    validate.positive_number("lr", 0.1)
    with pytest.raises(ValueError, match="lr must be a number > 0, got 0"):
        validate.positive_number("lr", 0)
    validate.one_of("mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match="mode must be one of 'a', 'b', got 'c'"):
        validate.one_of("mode", "c", ("a", "b"))
