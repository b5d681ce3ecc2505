"""The docs site: every public name has a home in the API reference, every learning-path step a page.

CI builds the site with ``mkdocs build --strict`` (.ci/run), which fails on a broken reference; these
checks catch what a build cannot see: a public name left out of the reference, a step without a page.
"""

import importlib
import inspect
import re
import types
from pathlib import Path

import pytest

import ftransformer as ft

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def documented_modules() -> set[str]:
    found = set()
    for page in (DOCS / "api").glob("*.md"):
        found |= set(re.findall(r"^::: (ftransformer[\w.]*)", page.read_text(), flags=re.M))
    return found


def home_module(owner: types.ModuleType, name: str) -> str:
    """The module that defines ``owner.name``: a function's or class's ``__module__``, else the owner's
    submodule whose source assigns the name."""
    obj = getattr(owner, name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return obj.__module__
    for mod_name in sorted(documented_modules()):
        mod = importlib.import_module(mod_name)
        if getattr(mod, name, None) is obj and re.search(rf"^{name}\b.*=", inspect.getsource(mod), flags=re.M):
            return mod_name
    return f"<no documented module assigns {name}>"


@pytest.mark.skipif(not DOCS.is_dir(), reason="no docs/ folder beside the tests")
@pytest.mark.parametrize("owner", [ft, ft.layers, ft.interp], ids=lambda m: m.__name__)
def test_every_public_name_is_in_the_api_reference(owner):
    modules = documented_modules()
    missing = []
    for name in owner.__all__:
        home = home_module(owner, name)
        # A public subpackage counts as documented when its modules are.
        if home not in modules and not any(m.startswith(home + ".") for m in modules):
            missing.append(f"{owner.__name__}.{name} (defined in {home})")
    assert not missing, "not in any docs/api page: " + ", ".join(missing)


@pytest.mark.skipif(not DOCS.is_dir(), reason="no docs/ folder beside the tests")
def test_every_learning_path_step_has_a_page_in_the_nav_with_its_example():
    nav = (ROOT / "mkdocs.yml").read_text()
    examples = sorted(p.name for p in (ROOT / "examples").glob("[0-9][0-9]_*.py"))
    assert len(examples) >= 8
    for example in examples:
        number = example[:2]
        pages = list((DOCS / "course").glob(f"{number}-*.md"))
        assert len(pages) == 1, f"step {number} ({example}) has no page docs/course/{number}-*.md"
        assert f'--8<-- "examples/{example}"' in pages[0].read_text(), f"{pages[0].name} does not include {example}"
        assert f"course/{pages[0].name}" in nav, f"{pages[0].name} is not in mkdocs.yml's nav"
