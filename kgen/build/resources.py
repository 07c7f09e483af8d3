"""Where the templates and the GRUB tree are: beside the package in a wheel, at the top of a checkout otherwise."""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # the kgen package


def _find(name: str) -> Path:
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kgen installation is incomplete: no {name}/ directory beside {_PACKAGE}")


def templates_dir() -> Path:
    return _find("templates")


def boot_dir() -> Path:
    return _find("boot")
