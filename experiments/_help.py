"""`--help` for the config-file jobs: the job's docstring and every config field, then exit 0.

absl's own `--help` exits with status 1 and lists only `--config`; a researcher wants the fields
they can override (`--config.train.steps=…`), their defaults and types.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Iterator


def config_fields(config: Any, prefix: str = "config") -> Iterator[tuple[str, Any]]:
    """(dotted name, default) of every leaf of an ml-collections ConfigDict, in definition order."""
    from ml_collections import ConfigDict

    for name in config.keys():
        value = config[name]
        if isinstance(value, ConfigDict):
            yield from config_fields(value, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", value


def load_config(path: str) -> Any:
    """`get_config()` of the config file at `path`."""
    spec = importlib.util.spec_from_file_location("_job_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def help_text(doc: str, config_path: str) -> str:
    """The job's docstring, then one line per config field: `--config.a.b=default  (type)`."""
    lines = [doc.strip(), "", f"config fields (defaults from {config_path}; override with --config.FIELD=VALUE):"]
    for name, value in config_fields(load_config(config_path)):
        lines.append(f"  --{name}={value!r}  ({type(value).__name__})")
    lines += ["", f"  --config=PATH  another config file (default {config_path})"]
    return "\n".join(lines)


def exit_with_help_if_asked(doc: str, config_path: str, argv: list[str] | None = None) -> None:
    """Print `help_text` and exit 0 when the command line asks for help (-h, --help, --helpfull)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        print(help_text(doc, config_path))
        raise SystemExit(0)
