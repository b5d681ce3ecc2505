"""The axis glossary is the one vocabulary: every annotation and einops pattern in the package uses it."""

import re
from pathlib import Path

import pytest
import torch
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from ftransformer import random, shapes

PACKAGE = Path(__file__).resolve().parent.parent / "ftransformer"
# jaxtyping's own symbols: "..." and "_" (any axes / any size), numbers (a fixed size), and the axis
# sizes einops patterns write as numbers or parentheses.
ANNOTATION = re.compile(r"\b(?:Float|Int|Bool|Int8|Shaped|Num|Real|Integer)\[\s*\w+,\s*\"([^\"]*)\"")
EINOPS_CALL = re.compile(r"\b(?:rearrange|repeat|reduce|einsum_equation)\(")
ARROW_STRING = re.compile(r"\"([^\"]*->[^\"]*)\"")


def einops_patterns(source: str) -> list[str]:
    """The pattern of every einops call (its first string with an arrow)."""
    found = (ARROW_STRING.search(source, m.end(), m.end() + 400) for m in EINOPS_CALL.finditer(source))
    return [m.group(1) for m in found if m]


def axis_words(text: str) -> set[str]:
    words = re.split(r"[\s,()]+|->", text)
    return {w.lstrip("*#") for w in words} - {"", "...", "_"} - {w for w in words if w.isdigit()}


def test_every_annotation_and_einops_pattern_uses_glossary_axes():
    unknown = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for pattern in ANNOTATION.findall(source) + einops_patterns(source):
            extra = axis_words(pattern) - set(shapes.AXES)
            if extra:
                unknown.setdefault(str(path.relative_to(PACKAGE)), set()).update(extra)
    assert not unknown, f"axis names outside shapes.AXES: {unknown}"


def test_einsum_equation_translates_glossary_words_to_letters():
    equation = shapes.einsum_equation("... heads seq head_dim, heads head_dim d_model -> ... heads seq d_model")
    o, w = torch.randn(2, 3, 5, 4), torch.randn(3, 4, 6)
    torch.testing.assert_close(torch.einsum(equation, o, w), torch.einsum("bhsd,hdm->bhsm", o, w))
    with pytest.raises(ValueError, match="'query'"):
        shapes.einsum_equation("... query head_dim -> ... query")


def test_key_alias_is_what_ftransformer_random_makes():
    @jaxtyped(typechecker=beartype)
    def takes_key(k: shapes.Key) -> None:
        return None

    takes_key(random.key(3))
    takes_key(random.split(random.key(3), 4)[1])
    with pytest.raises(TypeCheckError):
        takes_key(random.split(random.key(3), 4))
