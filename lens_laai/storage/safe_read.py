"""Reading files other people made: bounded, never through a symlink, never blocking, JSON with limits.

A save directory, a task file or a survey file may be shared, edited by hand or hostile. Reads
here open only regular files (``O_NOFOLLOW`` and ``O_NONBLOCK``, then ``fstat`` on the open
descriptor, so a symlink, a FIFO, a device or a directory is refused before a byte is read and
nothing can swap the file between the check and the read), cap the size, and parse JSON with
limits on nesting, number length and strings that are not valid Unicode. Every refusal is the
caller's :class:`~lens_laai.errors.LensLaaiError` subclass, naming the file and the problem.

Example:
    >>> from lens_laai.errors import TaskError
    >>> loads_json(b'{"a": [1, 2]}', "example.json", TaskError)
    {'a': [1, 2]}
    >>> loads_json(b"[" * 1000 + b"]" * 1000, "deep.json", TaskError)
    Traceback (most recent call last):
    ...
    lens_laai.errors.TaskError: deep.json: JSON nested deeper than 64 levels; this is not a file lens_laai wrote.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Any

from lens_laai.errors import LensLaaiError

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 400
MAX_JSON_BYTES = 256 * 2**20
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def read_regular_file(
    path: str | os.PathLike,
    error: type[LensLaaiError],
    *,
    max_bytes: int | None = None,
    expect_bytes: int | None = None,
    dir_fd: int | None = None,
    follow_symlinks: bool = False,
) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a symlink, FIFO, device or directory) of an allowed size.

    With ``dir_fd``, ``path`` is a plain name looked up in that open directory. ``expect_bytes``
    (the size a manifest records) must match exactly; ``max_bytes`` caps it otherwise. A file the
    user names directly (a task file) may be a link to a regular file (``follow_symlinks``); a file
    inside a save may not.

    Example:
        >>> import os, pathlib, tempfile
        >>> from lens_laai.errors import TaskError
        >>> from lens_laai.storage.safe_read import read_regular_file
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "task.json").write_text("[]")
        >>> read_regular_file(folder / "task.json", TaskError)
        b'[]'
        >>> os.symlink(folder / "task.json", folder / "link.json")
        >>> try:
        ...     read_regular_file(folder / "link.json", TaskError)
        ... except TaskError as err:
        ...     print(str(err).split(";")[0].endswith("is a symbolic link"))
        True
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise error(
                f"{path} is a symbolic link; lens_laai reads only regular files, never through a link."
            ) from None
        raise error(f"Cannot read {path}: {err.strerror or err}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is {_kind(info.st_mode)}, not a regular file; refusing to read it.")
        if expect_bytes is not None and info.st_size != expect_bytes:
            raise error(
                f"{path} has {info.st_size} bytes, but its manifest records {expect_bytes}; "
                "the save is corrupt, truncated or was edited."
            )
        limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
        if info.st_size > limit:
            raise error(f"{path} has {info.st_size} bytes, more than the {limit} lens_laai reads from such a file.")
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as err:
        raise error(f"Cannot read {path}: {err.strerror or err}.") from None
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise error(f"{path} changed size while it was read; try again.")
    return data


def loads_json(data: bytes | str, where: str, error: type[LensLaaiError], *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON with limits: nesting ≤ ``max_depth``, numbers ≤ 400 characters, finite, no lone surrogates.

    Example:
        >>> from lens_laai.errors import TaskError
        >>> from lens_laai.storage.safe_read import loads_json
        >>> loads_json('{"pairs": [["hot", "cold"]]}', "task.json", TaskError)
        {'pairs': [['hot', 'cold']]}
        >>> try:
        ...     loads_json("[NaN]", "task.json", TaskError)
        ... except TaskError as err:
        ...     print(err)
        task.json: not valid JSON (NaN is not a JSON number).
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{where}: {len(raw)} bytes of JSON is more than lens_laai reads ({MAX_JSON_BYTES}).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{where}: JSON nested deeper than {max_depth} levels; this is not a file lens_laai wrote.")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_int=_number(int), parse_float=_number(float))
    except (ValueError, RecursionError) as err:
        raise error(f"{where}: not valid JSON ({err}).") from None
    bad = _bad_string(value)
    if bad is not None:
        raise error(f"{where}: the string {bad[:60]!r} holds a lone UTF-16 surrogate, which is not text.")
    return value


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON text (brackets inside strings do not count).

    Example:
        >>> from lens_laai.storage.safe_read import json_depth
        >>> json_depth(b'{"a": [[1], "[[[not counted]]]"]}')
        3
    """
    depth = best = 0
    for match in _BRACKETS.finditer(_STRING.sub(b"", raw)):
        depth += 1 if match[0] in b"[{" else -1
        best = max(best, depth)
    return best


def _number(kind: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text)} characters")
        value = kind(text)
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            raise ValueError(f"the number {text[:40]} overflows")
        return value

    return parse


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bad_string(value: Any) -> str | None:
    """The first string (key or value) in ``value`` that cannot be encoded as UTF-8, if any."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"
