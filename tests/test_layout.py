"""The code's layout: imports go jobs -> pipeline -> schemas; inside pipeline/ they follow the
data's flow through its rooms; and no module imports itself back through others (an import
inside a function counts: it is a dependency all the same)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "pipeline", "schemas")
LAYER = {"schemas": 0, "pipeline": 1, "jobs": 2}
# pipeline/'s rooms in the order of the data's flow; a room imports only rooms before it and the
# modules at pipeline/'s top (config, storage, timing, progress), which import no room.
ROOMS = ("read", "decode", "embed", "write", "run", "table", "query", "serve")


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts): path
            for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
            if path.name != "__init__.py"}


def _room(module: str) -> int:
    """0 for a module at pipeline/'s top, else 1 + its room's place in the flow."""
    parts = module.split(".")
    return 1 + ROOMS.index(parts[1]) if len(parts) > 2 else 0


def _imports(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import storage` imports the module pipeline.storage
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_imports_go_one_way():
    wrong = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
             if LAYER[target.split(".")[0]] > LAYER[module.split(".")[0]]]
    assert not wrong, wrong


def test_every_module_of_pipeline_is_at_its_top_or_in_a_room():
    stray = [m for m in _modules() if m.startswith("pipeline.") and len(m.split(".")) > 2
             and m.split(".")[1] not in ROOMS]
    assert not stray, stray
    assert len([m for m in _modules() if m.startswith("pipeline.") and len(m.split(".")) == 2]) <= 5


def test_rooms_import_along_the_flow():
    """read < decode < embed < write < run < table < query < serve: no import runs back."""
    wrong = [f"{module} imports {target}" for module, targets in _graph().items()
             if module.startswith("pipeline.") for target in targets
             if target.startswith("pipeline.") and _room(target) > _room(module)]
    assert not wrong, wrong


def test_no_import_cycle():
    graph = _graph()
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_check_sees_imports():
    """The walk finds what it is meant to (else the tests above could pass on nothing)."""
    graph = _graph()
    assert "pipeline.run.prepare" in graph["jobs.embed"] and "jobs.options" in graph["jobs.cli"]
    assert "pipeline.storage" in graph["pipeline.decode.fetch"]  # `from pipeline import storage`
    assert "pipeline.read.webdataset" in graph["pipeline.read.ids"]  # `from pipeline.read import webdataset`
    assert "pipeline.decode.images" in graph["pipeline.embed.model"]  # a later room on an earlier one
    assert _room("pipeline.read.ids") < _room("pipeline.serve.app") and _room("pipeline.storage") == 0


# --- Library errors speak of values; the CLI names the flags ----------------------------------

FLAG = re.compile(r"--[a-z][a-z-]*")


def _commands():
    """Every `altclip` command, the subcommands of a group included."""
    import click

    from jobs.cli import COMMANDS, main

    ctx = click.Context(main)
    commands = [main.get_command(ctx, name) for name in COMMANDS]
    return commands + [sub for group in commands if isinstance(group, click.Group)
                       for sub in group.commands.values()]


def _config_errors() -> list[tuple[str, ast.Call]]:
    """Every `raise ConfigError(...)` of the library, with where it is."""
    found = []
    for name, path in _modules().items():
        if name.startswith("jobs."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigError" and node.args:
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return found


def _literal_text(node: ast.AST) -> str:
    """The literal parts of a message (an f-string's constants; a value stands as {})."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(part) if isinstance(part, ast.Constant) else "{}"
                       for part in node.values)
    return ""


def _named_settings() -> dict[str, str]:
    """setting -> where, for each `named("setting")` in the library, and the settings given as
    strings to the helpers that name them (`require("image_col", ...)`, ...)."""
    found = {}
    for name, path in _modules().items():
        if name.startswith("jobs."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "named"
                    and isinstance(node.args[0], ast.Constant)):
                found[node.args[0].value] = f"{path.relative_to(REPO)}:{node.lineno}"
    return found


def test_library_errors_name_no_flags():
    """A library error names settings as their callers pass them (`named("vector_dtype")`); the
    CLI turns each into its flag (jobs/options.in_cli_terms). A flag written into a library
    message would read wrong to a caller of the library, and in any command whose flag differs."""
    flags = {opt for command in _commands() for param in command.params
             for opt in getattr(param, "opts", ())}
    assert {"--vector-dtype", "--out", "--table"} <= flags
    errors = _config_errors()
    assert len(errors) > 40  # the walk sees them
    wrong = [f"{where}: {text!r}" for where, node in errors
             for text in [_literal_text(node.args[0])]
             if set(FLAG.findall(text)) & flags or "altclip " in text]
    assert not wrong, wrong


def test_every_setting_a_library_error_names_is_an_option_of_a_command():
    """Each setting named in a message is an option or argument of some `altclip` command, so the
    CLI has a flag to show for it (a typo in a name would show a flag that does not exist)."""
    spellings = set()
    for command in _commands():
        for param in command.params:
            spellings.add(param.name)
            spellings.update(opt.lstrip("-").replace("-", "_") for opt in getattr(param, "opts", ()))
    named = _named_settings()
    assert {"vector_dtype", "out", "model", "towers"} <= set(named)  # the walk sees them
    unknown = {setting: where for setting, where in named.items() if setting not in spellings}
    assert not unknown, unknown
