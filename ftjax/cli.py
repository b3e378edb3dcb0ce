"""The command line: `ftjax --config configs/NAME.py[:ARG] --workdir DIR [--config.a.b=v ...]`.

Parses argv into (config spec, workdir, overrides), prints `--help` with the list of shipped
experiment configs, and is the target of the `ftjax` console script (`ftjax.main:cli`).

Why not `ml_collections.config_flags`: it cannot override a field whose default is None (it
refuses `--config.distributed.num_processes=2`, which every multi-host launch needs), reports
an unknown key as a Python traceback rather than one line naming the key and its siblings,
and imports config files without putting their package on `sys.path` (`from configs import
common` fails outside the repository root). The override grammar is the same.
"""
from __future__ import annotations

import ast
import os
import sys
import textwrap
from collections.abc import Sequence

from ftjax import paths

__all__ = ["parse_cli", "help_text", "list_configs", "HelpRequested"]


class HelpRequested(Exception):
    """Raised by `parse_cli` for `-h`/`--help`; the entry point prints `help_text()` (or
    `config_help(e.config)` when a --config was given too)."""

    def __init__(self, config: str | None = None):
        super().__init__(config)
        self.config = config


def _config_in(args: Sequence[str]) -> str | None:
    """The value of a --config flag in `args`, if any (for `--config FILE --help`)."""
    for i, a in enumerate(args):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(args) and not args[i + 1].startswith("-"):
            return args[i + 1]
    return None


_SUPPORTED = ("--config FILE[.py[:ARG]]", "--workdir DIR", "--config.<key>=VALUE")


def parse_cli(
    argv: Sequence[str], *, extra_flags: Sequence[str] = (), require_config: bool = True
) -> tuple[str | None, str | None, list[tuple[str, str]], dict[str, str]]:
    """Parses `argv` (without the program name) into (config_spec, workdir, overrides, extra).

    Understands `--config X`, `--config=X`, `--workdir D`, `--workdir=D`, `--config.a.b=v` and
    `--config.a.b v`. Flags named in `extra_flags` (e.g. `"eval_only"`) are returned in `extra`
    as strings; given bare (`--eval_only`) they read "true". Anything else is an error that
    lists the supported flags.
    """
    supported = list(_SUPPORTED) + [f"--{f}[=VALUE]" for f in extra_flags]
    config_spec: str | None = None
    workdir: str | None = None
    overrides: list[tuple[str, str]] = []
    extra: dict[str, str] = {}
    args = list(argv)
    i = 0

    def take_value(flag: str, inline: str | None, optional: bool = False) -> str:
        nonlocal i
        if inline is not None:
            return inline
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            return args[i]
        if optional:
            return "true"
        raise ValueError(f"flag {flag} needs a value ({flag}=VALUE or {flag} VALUE)")

    while i < len(args):
        tok = args[i]
        if tok in ("-h", "--help", "-help", "--helpfull"):
            raise HelpRequested(_config_in(args))
        if not tok.startswith("--"):
            raise ValueError(
                f"unexpected argument {tok!r}; supported flags: {', '.join(supported)}"
            )
        name, eq, inline_val = tok[2:].partition("=")
        inline = inline_val if eq else None
        if name == "config":
            if config_spec is not None:
                raise ValueError("--config given twice")
            config_spec = take_value("--config", inline)
        elif name == "workdir":
            if workdir is not None:
                raise ValueError("--workdir given twice")
            workdir = take_value("--workdir", inline)
        elif name.startswith("config."):
            key = name[len("config."):]
            overrides.append((key, take_value(f"--{name}", inline)))
        elif name in extra_flags:
            extra[name] = take_value(f"--{name}", inline, optional=True)
        else:
            raise ValueError(f"unknown flag '--{name}'; supported flags: {', '.join(supported)}")
        i += 1
    if require_config and config_spec is None:
        raise ValueError("missing --config FILE.py[:ARG]; supported flags: " + ", ".join(supported))
    return config_spec, workdir, overrides, extra


def _docstring(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return (ast.get_docstring(ast.parse(f.read())) or "").strip()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""


def _purpose(doc: str) -> str:
    """A docstring's first paragraph (a config's purpose), on one line."""
    return " ".join(doc.split("\n\n", 1)[0].split()) if doc else ""


def list_configs() -> list[tuple[str, str]]:
    """`[("configs/NAME.py", one-line purpose), ...]` for the shipped experiment configs."""
    try:
        cfg_dir = os.path.join(paths.root(), "configs")
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(os.listdir(cfg_dir)):
        if name.endswith(".py") and not name.startswith("_") and name != "common.py":
            out.append((f"configs/{name}", _purpose(_docstring(os.path.join(cfg_dir, name)))))
    return out


def _arguments_line(spec: str) -> str:
    """`name:type=default ...` for a config file's typed arguments (or why they are unknown)."""
    from ftjax import config_utils
    try:
        args = config_utils.config_arguments(spec)
    except Exception as e:  # a broken config must not break --help
        return f"(arguments unavailable: {type(e).__name__}: {e})"
    return " ".join(f"{k}:{type(v).__name__}={v}" for k, v in args.items()) or "(no arguments)"


def _wrap(text: str, indent: str, width: int = 100, initial: str | None = None) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent if initial is None else initial,
                         subsequent_indent=indent, break_on_hyphens=False) or [indent.rstrip()]


def config_help(spec: str) -> str:
    """`--config FILE --help`: the config's whole docstring and its typed arguments."""
    path = paths.resolve(spec.partition(":")[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {spec!r} does not exist")
    lines = [f"{spec.partition(':')[0]}", ""]
    lines += ["  " + ln if ln else "" for ln in _docstring(path).splitlines()]
    lines += ["", "typed arguments (--config FILE.py:name=value,name=value):"]
    lines += _wrap(_arguments_line(spec), "  ")
    return "\n".join(lines) + "\n"


def help_text(prog: str = "ftjax") -> str:
    """Usage, flags, override grammar and the shipped configs (purpose and typed arguments)."""
    lines = [
        f"usage: {prog} --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]",
        "",
        "Runs the experiment that a config file defines (get_config(arg) -> ConfigDict).",
        "",
        "flags:",
        "  --config FILE.py[:ARG]  the experiment; ARG is typed, e.g. configs/lora_sft.py:rank=16",
        "                          (relative paths are tried in the current directory, then",
        "                          under the ftjax root, so configs/... works from anywhere)",
        "  --workdir DIR           checkpoints, metrics, config.json; a local path or a URL",
        "                          such as gs://bucket/run; an existing checkpoint is resumed",
        "  --config.KEY=VALUE      override one field, typed by its current value, e.g.",
        "                          --config.optimizer.learning_rate=2e-4; unknown keys and",
        "                          wrong types are refused with the key named",
        "  -h, --help              this text; with --config FILE, that config's full help",
        "",
        "configs (purpose; then ': ' and the typed arguments as name:type=default):",
    ]
    configs = list_configs()
    for p, doc in configs:
        lines.append(f"  {p}")
        lines += _wrap(doc, "      ")
        lines += _wrap(_arguments_line(p), "      ", initial="    : ")
    if not configs:
        lines.append("  (none found)")
    return "\n".join(lines) + "\n"


def print_help(file=None, config: str | None = None) -> None:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ftjax"
    text = (config_help(config) if config else
            help_text("python -m ftjax.main" if prog == "main.py" else prog))
    (file or sys.stdout).write(text)


def run_main(main_fn) -> None:
    """Runs a command's `main()`. The errors a user's input causes become one line on stderr:
    configuration and input errors (ValueError, incl. bad data and weight files; OSError, e.g. a
    missing file) exit with code 2, a non-finite loss in training (FloatingPointError) with 1.
    `FTJAX_DEBUG=1` re-raises them with their traceback; any other exception is a bug and
    keeps its traceback."""
    try:
        main_fn()
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("FTJAX_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, FloatingPointError) else 2)
