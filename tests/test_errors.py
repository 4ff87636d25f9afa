"""The one error tree: every error class of the four packages has one root and a stable code."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil

import pytest

from cloud_sync.errors import CircuitOpen, CloudSyncError, CloudUnavailable
from edge_agent.errors import AgentError, UnknownFunction
from hardware.errors import EdgefnError, HardwareError
from runtimes.errors import RuntimeErrorBase, Unavailable

PACKAGES = ("hardware", "runtimes", "cloud_sync", "edge_agent")
# The subtree each package's errors belong to. The agent's hang under the runtimes root because
# the same local HTTP API answers both (they carry `status`).
SUBTREE = {
    "hardware": HardwareError,
    "runtimes": RuntimeErrorBase,
    "cloud_sync": CloudSyncError,
    "edge_agent": RuntimeErrorBase,
}


def _modules() -> list[str]:
    """The Python modules of the four packages.

    Left out: `__main__` (importing it runs the CLI) and compiled extensions such as
    `runtimes.cpp._host`: their exceptions are foreign, converted at the boundary that calls them
    (`runtimes.cpp.inproc` turns the host's LoadError into a BundleError).
    """
    names = []
    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        names.append(pkg)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{pkg}."):
            spec = importlib.util.find_spec(info.name)
            compiled = spec is not None and not str(spec.origin).endswith(".py")
            if not info.name.endswith("__main__") and not compiled:
                names.append(info.name)
    return names


def error_classes() -> list[type[BaseException]]:
    """Every exception class defined (not imported) in the four packages.

    Private classes (`_Name`) are control flow inside one module and never leave it, so they
    are left out.
    """
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)  # an import error fails the test: no skipping
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and not attr.startswith("_")
                and obj is not EdgefnError
            ):
                found[f"{name}.{attr}"] = obj
    return list(found.values())


CLASSES = error_classes()


def test_the_walk_finds_the_errors_of_every_package() -> None:
    packages = {c.__module__.split(".")[0] for c in CLASSES}
    assert packages == set(PACKAGES)
    assert len(CLASSES) >= 50  # a walk that silently found nothing cannot pass


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_error_derives_from_the_one_root_and_its_package_subtree(
    cls: type[BaseException],
) -> None:
    assert issubclass(cls, EdgefnError)
    assert issubclass(cls, SUBTREE[cls.__module__.split(".")[0]])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_error_class_names_its_own_code(cls: type[BaseException]) -> None:
    code = vars(cls).get("code")
    assert isinstance(code, str), f"{cls.__name__} inherits its code; give it its own"
    assert code and code == code.lower() and " " not in code


def test_codes_are_unique_across_the_tree() -> None:
    owners: dict[str, list[str]] = {}
    for cls in [*CLASSES, EdgefnError]:  # the root's own code is taken too
        owners.setdefault(str(vars(cls)["code"]), []).append(cls.__qualname__)
    shared = {code: names for code, names in owners.items() if len(names) > 1}
    assert not shared


def test_the_shape_every_error_carries() -> None:
    exc = UnknownFunction("no function 'x'")
    assert exc.to_dict() == {
        "code": "unknown_function",
        "category": "request",
        "message": "no function 'x'",
    }
    assert exc.status == 404
    assert exc.one_line() == "no function 'x' (unknown_function)"
    precise = HardwareError("bad\n  limits", code="bad_limits")
    assert precise.code == "bad_limits" and precise.one_line() == "bad limits (bad_limits)"
    assert isinstance(AgentError("x"), RuntimeErrorBase)


def test_cloud_unavailable_is_a_cloud_sync_error_the_router_treats_as_unavailable() -> None:
    exc = CircuitOpen("paused")
    assert isinstance(exc, CloudSyncError) and isinstance(exc, Unavailable)
    assert isinstance(exc, CloudUnavailable)
    assert exc.category == "transport" and exc.status == 502
    assert exc.code == "cloud_circuit_open"
