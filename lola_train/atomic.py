"""Atomic file writes: a crash or kill leaves either the previous complete file or the new one, never a part."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: Path, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temp file in ``path``'s folder, fsync it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data: Any, *, expand_depth: int | None = None) -> None:
    """``data`` as JSON, indented by 2. With ``expand_depth`` = n only the first n levels of nesting are laid out
    one item per line; anything deeper stays on its item's line (per-sample diagnostics: a third of the bytes)."""
    text = json.dumps(data, indent=2) if expand_depth is None else dumps_expanded(data, expand_depth)
    atomic_write(path, lambda f: f.write(text + "\n"), binary=False)


def dumps_expanded(data: Any, depth: int, level: int = 0, indent: int = 2) -> str:
    """JSON with dicts and lists laid out one item per line down to ``depth`` levels, single-line below."""
    if level >= depth or not isinstance(data, (dict, list)) or not data:
        return json.dumps(data)
    pad, end = " " * indent * (level + 1), " " * indent * level
    if isinstance(data, dict):
        items = [f"{pad}{json.dumps(str(k))}: {dumps_expanded(v, depth, level + 1, indent)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    items = [pad + dumps_expanded(v, depth, level + 1, indent) for v in data]
    return "[\n" + ",\n".join(items) + "\n" + end + "]"
