"""The layering rule of issue 11: domain and store code takes the collaborators it uses, never
the lifespan's holder of all of them (`tessera.services.Tessera`); routes name each one they
use through its own dependency (api/deps.py). A new engineer can read what a function or a
route touches from its signature."""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi.routing import APIRoute

import tessera
from tessera.api.openapi import api_routes
from tessera.config import Settings
from tessera.main import create_app
from tessera.services import Tessera

PACKAGE = Path(tessera.__file__).parent
HOLDER_MODULE = "tessera.services"


def _modules(*layers: str) -> Iterator[Path]:
    for layer in layers:
        yield from sorted((PACKAGE / layer).rglob("*.py"))


def _names_holder(annotation: ast.expr | None) -> bool:
    """An annotation that mentions `Tessera`: a name, `services.Tessera`, or a string."""
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == "Tessera":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "Tessera":
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                if _names_holder(ast.parse(node.value, mode="eval").body):
                    return True
            except SyntaxError:  # a string that is no annotation
                continue
    return False


def _violations(path: Path) -> list[str]:
    return _violations_in(path.read_text(), str(path.relative_to(PACKAGE.parent)))


def _violations_in(text: str, where: str) -> list[str]:
    tree = ast.parse(text, filename=where)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno} imports {alias.name}" for alias in node.names
                      if alias.name == HOLDER_MODULE]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == HOLDER_MODULE or (module == "tessera" and any(
                    alias.name == "services" for alias in node.names)):
                found.append(f"{where}:{node.lineno} imports from {HOLDER_MODULE}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                        *([args.vararg] if args.vararg else []),
                        *([args.kwarg] if args.kwarg else [])]:
                if _names_holder(arg.annotation):
                    name = getattr(node, "name", "<lambda>")
                    found.append(f"{where}:{arg.lineno} {name}({arg.arg}: Tessera)")
    return found


def test_domain_and_stores_never_see_the_holder() -> None:
    modules = list(_modules("domain", "stores"))
    assert len(modules) > 10  # the walk found the packages
    violations = [v for path in modules for v in _violations(path)]
    assert violations == [], "\n".join(violations)


def test_the_check_sees_an_import_and_an_annotation() -> None:
    """The rule's own check finds what it is meant to find (else the test above proves
    nothing): the import, a plain annotation and a string one."""
    text = ("from tessera.services import Tessera\n"
            "async def f(db, t: Tessera, *, u: 'Tessera | None' = None) -> None: ...\n"
            "def g(holder: services.Tessera) -> None: ...\n"
            "def h(tessera: TesseraLike, db: AsyncSession) -> None: ...\n")
    assert _violations_in(text, "sample.py") == [
        "sample.py:1 imports from tessera.services", "sample.py:2 f(t: Tessera)",
        "sample.py:2 f(u: Tessera)", "sample.py:3 g(holder: Tessera)"]


def _takes_holder(call: Callable[..., Any]) -> list[str]:
    hints = typing.get_type_hints(call, include_extras=True)
    found = []
    for name in inspect.signature(call).parameters:
        hint = hints.get(name)
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if base is Tessera:
            found.append(f"{call.__module__}.{call.__qualname__}({name})")
    return found


def _dependency_calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _dependency_calls(dep)


def test_no_route_takes_the_holder(tmp_path: Path) -> None:
    """Every route and every dependency it solves names the collaborators it uses."""
    app = create_app(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0",
                              database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db"))
    routes: list[APIRoute] = api_routes(app.routes)
    assert len(routes) > 30
    violations = [v for route in routes
                  for call in (route.endpoint, *_dependency_calls(route.dependant))
                  for v in _takes_holder(call)]
    assert violations == [], "\n".join(violations)



def test_no_lean_handler_takes_the_holder() -> None:
    """The plain ASGI endpoints (api/lean.py) name their collaborators too: the dispatcher
    builds each handler from the holder in one place (`lean.handlers`), and no handler
    sees the holder itself."""
    import functools
    from types import SimpleNamespace

    from tessera.api import lean

    holder = SimpleNamespace(settings=SimpleNamespace(service_keys=[]), **{name: object() for name in (
        "usage", "auth", "policy", "db_factory", "factors", "metrics", "logins", "csrf_key",
        "audit_trail")})
    built = lean.handlers(holder)  # type: ignore[arg-type]
    assert set(built) == set(lean.ROUTES)
    functions = [h.func if isinstance(h, functools.partial) else h for h in built.values()]
    violations = [v for f in functions for v in _takes_holder(f)]
    assert violations == [], "\n".join(violations)
    assert _takes_holder(lean.handlers) == ["tessera.api.lean.handlers(t)"]  # the one place
