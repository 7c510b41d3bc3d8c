"""Names of a package that load on first use (PEP 562), so that importing the package stays cheap:
`uqdm info` reads a `.uqdm` container and `uqdm plot` a results file without importing torch."""

import importlib


def lazy_exports(package: str, homes: dict[str, str]):
    """`(__getattr__, __dir__)` for `package` whose names in `homes` live in the modules they map
    to (relative to the package), imported when a name is first read."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name], package), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(homes))

    return __getattr__, __dir__
