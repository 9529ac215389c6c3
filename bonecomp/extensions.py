"""User code that extends the pipeline: the modules named by the config's ``extensions``.

A loss term, TTA view, architecture, metric, tracker, preprocessing step, clean-up rule
or fold stratifier is registered by a call in the user's own module (``register_loss``,
``register_view``, ``register_arch``, ``register_metric``, ``register_tracker``,
``register_preprocess``, ``register_cleanup``, ``register_stratifier``; see
docs/extending.md). Listing that module under ``extensions`` makes every script
import it before the config check, and inference imports a checkpoint's extensions
before it rebuilds the model, so a registered name works through the normal config with
no edit of the library. An entry is a dotted module name on ``sys.path`` or a ``.py``
file (relative to the working directory). Each module is imported once per process (a
second import would register its names twice).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from bonecomp.config import ConfigError

KEY = "extensions"
FILE_MODULE_PREFIX = "bonecomp_extension_"  # the module name of an entry loaded from a file


def import_extensions(names: Sequence[str]) -> list[ModuleType]:
    """Import each module of ``names`` (once); a module that cannot be found, fails to
    import, or ends the program while imported (``sys.exit``, an argument parser reading
    the script's command line) is a one-line ``ConfigError`` with key ``extensions[i]``
    (the caller adds where the value came from)."""
    return [_import_one(name, f"{KEY}[{i}]") for i, name in enumerate(names)]


def _import_one(name: str, key: str) -> ModuleType:
    said = io.StringIO()  # the module's stderr while it is imported: replayed, unless it exits
    try:
        with contextlib.redirect_stderr(said):
            try:
                if name.endswith(".py"):
                    return _import_file(Path(name), key)
                return importlib.import_module(name)
            except SystemExit as e:  # sys.exit() at import, or argparse on the script's argv
                raise _exited(name, key, e, said) from None
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        if e.name != name and not name.startswith(f"{e.name}."):
            raise _failed(name, key, e) from e  # a module that it imports is missing
        raise ConfigError(
            f"{key}: no module {name!r} (a dotted module name on the Python path, "
            "e.g. my_pkg.losses, or a .py file)",
            key,
        ) from None
    except Exception as e:  # the user's module raised while it was imported
        raise _failed(name, key, e) from e
    finally:
        sys.stderr.write(said.getvalue())


def _exited(name: str, key: str, e: SystemExit, said: io.StringIO) -> ConfigError:
    """The one line for a module that ended the program while imported; what it printed
    (argparse's usage and complaint) is not replayed, its last line is quoted."""
    last = [line for line in said.getvalue().splitlines() if line.strip()][-1:]
    said.seek(0)
    said.truncate()
    told = f": {_clip(last[0])}" if last else ""
    return ConfigError(
        f"{key}: importing {name!r} ended the program (sys.exit({e.code!r})){told}; an "
        "extension module may only define and register (a script's own code, such as "
        "parsing the command line, belongs under `if __name__ == '__main__':`)",
        key,
    )


def _import_file(path: Path, key: str) -> ModuleType:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{key}: no file {str(path)!r}", key)
    module_name = f"{FILE_MODULE_PREFIX}{path.stem}_{abs(hash(str(path))):x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: {str(path)!r} is not a Python module", key)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failed(name: str, key: str, e: BaseException) -> ConfigError:
    return ConfigError(f"{key}: importing {name!r} failed: {type(e).__name__}: {e}", key)
