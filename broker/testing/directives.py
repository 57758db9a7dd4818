"""The ``[PREFIX:NAME]`` / ``[PREFIX:NAME=VALUE]`` directives that script the fakes.

One syntax for both fakes: the fake CLI reads ``[sim:...]`` and the fake
Messages API reads ``[api:...]`` (see docs/testing-kit.md).  A directive may
stand anywhere in a prompt and several may be combined.  NAME is lower-case
letters and underscores.  VALUE runs to the ``]`` that closes the directive:
brackets and braces inside it must balance, and text in double quotes does not
count, so a JSON value (``[api:tool=Bash:{"command":"echo ]"}]``) is read
whole.  Text that does not parse as a directive is left alone: it stays part
of the prompt, which makes a typo visible in the reply.

Only the standard library is imported: the fake CLI loads this module at
every start-up.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not from typing: importing typing costs the fake CLI ~5 ms per start
if TYPE_CHECKING:
    from collections.abc import Iterator

_OPEN = {"[": "]", "{": "}"}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_")


def scan_directives(text: str, prefix: str) -> Iterator[tuple[str, str | None]]:
    """Yield ``(name, value)`` for each ``[prefix:name]`` (value ``None``) or
    ``[prefix:name=value]`` in ``text``, in order."""
    start_tag = f"[{prefix}:"
    pos = 0
    while (start := text.find(start_tag, pos)) >= 0:
        pos = start + len(start_tag)
        name_end = pos
        while name_end < len(text) and text[name_end] in _NAME_CHARS:
            name_end += 1
        if name_end == pos or name_end == len(text):
            continue
        name = text[pos:name_end]
        if text[name_end] == "]":
            pos = name_end + 1
            yield name, None
        elif text[name_end] == "=":
            close = _closing_bracket(text, name_end + 1)
            if close >= 0:
                pos = close + 1
                yield name, text[name_end + 1 : close]


def _closing_bracket(text: str, i: int) -> int:
    """Index of the ``]`` that ends a value starting at ``i``, or -1."""
    stack: list[str] = []
    in_string = False
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
        elif ch == "]" and not stack:
            return i
        i += 1
    return -1
