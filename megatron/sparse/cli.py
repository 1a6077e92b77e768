"""Typed command lines from config dataclasses, and one-line user errors."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import warnings
from typing import Any, Callable

_TYPES: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of its dataclass bases (megatron-core
    style field docs); a subclass's docstring wins."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--kebab-case`` flag per field; fields without a default are required."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        type_name = str(f.type).replace(" | None", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help
        if type_name == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        if type_name.startswith("list["):
            parser.add_argument(flag, type=_TYPES[type_name[5:-1]], nargs="+",
                                default=None if required else f.default_factory(),
                                required=required, help=help_text)
            continue
        parser.add_argument(flag, type=_TYPES[type_name], default=None if required else f.default,
                            required=required, help=help_text)


def dataclass_from_args(cls: type, ns: argparse.Namespace):
    """Build ``cls`` from the parsed flags of :func:`add_dataclass_args`."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


# Deprecation notices raised inside megatron-core / torch.distributed.checkpoint on every load;
# nothing a user of the tools can act on.
_LIBRARY_NOISE = r"(megatron\.core|torch\.distributed\.checkpoint)(\.|$)"
# megatron-core's notices that it falls back to torch modules (expected without the GPU extras)
# and that its own default CUDA-graph scope is deprecated.
_INTERNAL_NOTICE = (r"((Transformer Engine and )?Apex (is|are) not installed"
                    r"|full scope is deprecated)")


def quiet_library_notices() -> None:
    """Hide library warnings a tool's user cannot act on.

    Entry points call it before importing megatron-core, which warns at import time.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module=_LIBRARY_NOISE)
    warnings.filterwarnings("ignore", message=_INTERNAL_NOTICE, category=UserWarning)


def run_main(main: Callable[[], Any]) -> None:
    """Run a tool's main; user errors become ``error: ...`` on stderr and exit status 2."""
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
