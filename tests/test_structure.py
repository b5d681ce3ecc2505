"""The package's shape, checked: no import cycle (imports inside functions count), no long function.

These are the architecture rules of DESIGN.md made executable: arrows point down, one idea per function.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ftransformer"
MAX_LINES = 50
# Where a long function is accepted: argument parsers and benchmark tables read best as one listing.
LONG_FUNCTIONS_ALLOWED_IN = ("cli", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every ftransformer module that `module` imports, at the top or inside a function."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_package)
            names = [f"{target}.{alias.name}" for alias in node.names] + [target]
        else:
            continue
        for name in names:
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        # A package's __init__ re-exports its children: that edge is not an architectural arrow.
        graph[module] = {m for m in _imports(module, path, known) if not m.startswith(module + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _long_functions() -> list[str]:
    found = []
    for module, path in _modules().items():
        if any(part in LONG_FUNCTIONS_ALLOWED_IN for part in module.split(".")[1:2]):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > MAX_LINES:
                    found.append(f"{module}.{node.name} ({length} lines)")
    return found


def test_the_package_has_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (imports inside functions count): {cycles}"


def test_no_function_is_longer_than_fifty_lines_outside_cli_and_bench():
    long = _long_functions()
    assert not long, f"functions over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_aliases(module: str, tree: ast.Module, is_package: bool, known: set[str]) -> dict[str, str]:
    """The local names that stand for an ftransformer module in ``module`` (``from pkg import mod``, ``as``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_package)
            full = {a.asname or a.name: f"{target}.{a.name}" for a in node.names}
            aliases.update({name: module_ for name, module_ in full.items() if module_ in known})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in known})
    return aliases


def _private_imports() -> list[str]:
    """Every ``_private`` name that a module takes from ANOTHER ftransformer module (imported or read)."""
    modules = _modules()
    found = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, is_package)
                if target.split(".")[0] == "ftransformer" and target != module:
                    found += [f"{module}: {target}.{a.name}" for a in node.names if _is_private(a.name)]
        aliases = _module_aliases(module, tree, is_package, set(modules))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
                target = aliases.get(node.value.id)
                if target is not None and target != module:
                    found.append(f"{module}: {target}.{node.attr}")
    return sorted(set(found))


def test_no_module_uses_a_private_name_of_another_module():
    private = _private_imports()
    assert not private, f"private names used across modules (make them public): {private}"


def _modules_naming(words: tuple[str, ...]) -> list[str]:
    """The modules whose code names any of ``words`` (as a name or an attribute)."""
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in words:
                found.append(module)
                break
    return found


def test_only_the_tracing_module_asks_whether_torch_traces():
    askers = _modules_naming(("is_compiling", "is_functorch_wrapped_tensor"))
    assert askers == ["ftransformer.tracing"], f"ask ftransformer.tracing instead: {askers}"


def _isinstance_types(node: ast.AST) -> set[str]:
    """The type names an ``isinstance(x, T)`` / ``isinstance(x, (T, U))`` call tests, else nothing."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"):
        return set()
    if len(node.args) != 2:
        return set()
    types = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
    return {t.id for t in types if isinstance(t, ast.Name)}


def _hand_written_int_checks() -> list[str]:
    """``isinstance(x, bool) or not isinstance(x, int)`` (and its ``and not`` twin) outside validate.py."""
    found = []
    for module, path in _modules().items():
        if module == "ftransformer.validate":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BoolOp):
                tested = set().union(*(_isinstance_types(v.operand if isinstance(v, ast.UnaryOp) else v)
                                       for v in node.values))
                if {"bool", "int"} <= tested:
                    found.append(f"{module}:{node.lineno}")
    return found


def test_int_arguments_are_checked_by_the_validate_module():
    found = _hand_written_int_checks()
    assert not found, f"use ftransformer.validate (is_int, positive_int, ...) instead: {found}"


def _hand_written_bool_checks(tree: ast.Module, module: str) -> list[str]:
    """``not isinstance(x, bool)`` in ``tree``: a flag refused by hand instead of by ``validate.boolean``."""
    return [
        f"{module}:{node.lineno}" for node in ast.walk(tree)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and _isinstance_types(node.operand) == {"bool"}
    ]


def test_bool_arguments_are_checked_by_the_validate_module():
    found = [
        where for module, path in _modules().items() if module != "ftransformer.validate"
        for where in _hand_written_bool_checks(ast.parse(path.read_text()), module)
    ]
    assert not found, f"use ftransformer.validate.boolean instead: {found}"
    assert _hand_written_bool_checks(ast.parse("if not isinstance(flag, bool):\n    raise TypeError"), "m") == ["m:1"]


def _calls(node: ast.AST, name: str) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == name) or (isinstance(func, ast.Attribute) and func.attr == name)


def _block_inputs_names(fn: ast.FunctionDef) -> set[str]:
    """The names in ``fn`` that hold a ``BlockInputs``: annotated parameters and ``x = block_inputs(...)``."""
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    names = {a.arg for a in args if isinstance(a.annotation, ast.Name) and a.annotation.id == "BlockInputs"}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and _calls(node.value, "block_inputs"):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _positional_uses(tree: ast.Module) -> list[str]:
    """Where a ``BlockInputs`` is indexed by position (``x[0]``) or unpacked (``a, b, c = x``) in ``tree``."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = _block_inputs_names(fn)

        def holds(e, names=names):
            return _calls(e, "block_inputs") or (isinstance(e, ast.Name) and e.id in names)

        for node in ast.walk(fn):
            by_index = isinstance(node, ast.Subscript) and holds(node.value)
            unpacked = isinstance(node, ast.Assign) and holds(node.value)
            unpacked = unpacked and any(isinstance(t, (ast.Tuple, ast.List)) for t in node.targets)
            if by_index or unpacked:
                found.append(f"{fn.name}:{node.lineno}")
    return found


def _positional_block_inputs() -> list[str]:
    return [f"{m}.{use}" for m, path in _modules().items() for use in _positional_uses(ast.parse(path.read_text()))]


def test_block_inputs_is_a_named_tuple_read_by_field_names():
    import typing

    from ftransformer import model

    assert typing.get_type_hints(model.block_inputs)["return"] is model.BlockInputs
    assert issubclass(model.BlockInputs, tuple) and model.BlockInputs._fields == ("positions", "masks", "rotaries")
    positional = _positional_block_inputs()
    assert not positional, f"read BlockInputs by field name (.positions, .masks, .rotaries): {positional}"


def test_the_checker_sees_positional_block_inputs():
    source = "def f(inputs: BlockInputs):\n    a, b, c = inputs\n    d = block_inputs(t, c)[1]\n    e = inputs.masks[0]"
    assert _positional_uses(ast.parse(source)) == ["f:2", "f:3"]


RESHAPES = ("reshape", "view", "permute", "transpose", "flatten", "unflatten")
# (module, function) pairs of ftransformer.interp that may reshape by hand, each with its reason: their axes are
# decided at run time, where an einops pattern would have to be built from strings.
RESHAPES_ALLOWED: dict[tuple[str, str], str] = {
    ("ftransformer.interp.attribution", "_qk_star"): "through its by_kv",
    ("ftransformer.interp.attribution", "by_kv"): "the last axis is head_dim for q/k and kv_seq for patterns, by call",
    ("ftransformer.interp.edges", "_one_hot_cotangents"): "as many broadcast axes as the cotangent has batch axes",
    ("ftransformer.interp.patching", "patch_masks"): "the patch rows are (patched head x patched position), each of "
                                                      "size 1 or full as `by` says: no glossary word names them",
    ("ftransformer.interp.patching", "_sweep"): "the same patch rows, cut into position buckets",
    ("ftransformer.interp.patching", "arrange"): "the result's axes and their order are the caller's `by`",
    ("ftransformer.interp.plots", "_patch_grid"): "the result's axes and their order are the caller's `by`",
}


def _hand_reshapes(package: str = "ftransformer.interp") -> list[tuple[str, str]]:
    """``(module, function)`` of every ``.reshape(`` / ``.view(`` / ... call in ``package`` (einops elsewhere)."""
    found = []
    for module, path in _modules().items():
        if module != package and not module.startswith(package + "."):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    call = node.func if isinstance(node, ast.Call) else None
                    if isinstance(call, ast.Attribute) and call.attr in RESHAPES:
                        found.append((module, fn.name))
    return sorted(set(found))


def test_interp_reshapes_with_einops():
    by_hand = [f"{m}.{f}" for m, f in _hand_reshapes() if (m, f) not in RESHAPES_ALLOWED]
    assert not by_hand, f"use einops.rearrange (glossary axis names), or a reasoned RESHAPES_ALLOWED entry: {by_hand}"
    stale = [key for key in RESHAPES_ALLOWED if key not in _hand_reshapes()]
    assert not stale, f"RESHAPES_ALLOWED entries that no longer reshape by hand: {stale}"


# The Config specs whose fields only their own layer reads (layers.block: layout; model: embeddings; layers.attention:
# attention; layers.norm: norm; layers.embedding and model: positional). Interpretability calls those layers.
SPEC_FIELDS = ("layout", "embeddings", "attention", "norm", "positional")
# (module, what it reads) pairs of ftransformer.interp that may still read a spec's field, each with its reason.
SPEC_READS_ALLOWED: dict[tuple[str, str], str] = {}


def _spec_reads(tree: ast.Module) -> list[str]:
    """``cfg.<spec>.<field>`` reads (any name holding the config) and ``to_flat()`` calls in ``tree``: the spec
    itself may be passed on (``norm(p, x, cfg.norm)``), its fields are the owning layer's to read."""
    found = []
    for node in ast.walk(tree):
        spec = node.value if isinstance(node, ast.Attribute) else None
        if isinstance(spec, ast.Attribute) and spec.attr in SPEC_FIELDS and isinstance(spec.value, ast.Name):
            found.append(f"{spec.value.id}.{spec.attr}.{node.attr}")
        elif _calls(node, "to_flat"):
            found.append("to_flat()")
    return sorted(set(found))


def _interp_spec_reads() -> list[tuple[str, str]]:
    return [
        (module, read) for module, path in _modules().items() if module.startswith("ftransformer.interp")
        for read in _spec_reads(ast.parse(path.read_text()))
    ]


def test_interp_reads_the_specs_through_their_layers():
    reads = _interp_spec_reads()
    direct = [f"{m}: {r}" for m, r in reads if (m, r) not in SPEC_READS_ALLOWED]
    assert not direct, f"call the spec's layer (layers.block, layers.norm, layers.attention, model) instead: {direct}"
    stale = [key for key in SPEC_READS_ALLOWED if key not in reads]
    assert not stale, f"SPEC_READS_ALLOWED entries that no longer read a spec field: {stale}"


def test_the_checker_sees_spec_field_reads():
    source = (
        "def f(cfg, config):\n    if cfg.layout.mlp and config.embeddings.tie:\n        return norm(p, x, cfg.norm)\n"
        "    return cfg.to_flat()['norm'], cfg.head_dim"
    )
    assert _spec_reads(ast.parse(source)) == ["cfg.layout.mlp", "config.embeddings.tie", "to_flat()"]


if __name__ == "__main__":
    print("cycles:", _cycles(_graph()))
    print("long functions:", *_long_functions(), sep="\n  ")
