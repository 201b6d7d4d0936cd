"""Tables for the terminal: columns sized to their data.

A table is a list of :class:`Column`; each takes a row (any object: a
protobuf message, a dict) and returns its cell. :func:`render` sizes every
column to its widest cell (or its title), left- or right-aligned, and leaves
the last column unpadded so no line ends in spaces. Commands keep their
column lists next to them (``hsu status``'s are ``cli.INSTANCE_COLUMNS``);
a new column is one more :class:`Column` in that list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple


class Column(NamedTuple):
    #: the header, upper case by convention (``STATE``)
    title: str
    #: the row's cell; ``None`` and ``""`` print as ``-``
    cell: Callable[[Any], object]
    #: ``"<"`` left (text) or ``">"`` right (numbers)
    align: str = "<"


def cells(row: Any, columns: Sequence[Column]) -> list[str]:
    """One row's cells as text."""
    out = []
    for column in columns:
        value = column.cell(row)
        out.append("-" if value is None or value == "" else str(value))
    return out


def widths(rows: Iterable[Sequence[str]], columns: Sequence[Column], header: bool) -> list[int]:
    sizes = [len(c.title) if header else 0 for c in columns]
    for i, column in enumerate(zip(*rows, strict=True)):  # column by column
        sizes[i] = max(sizes[i], *map(len, column))
    return sizes


def line(row: Sequence[str], columns: Sequence[Column], sizes: Sequence[int]) -> str:
    """One row, padded to ``sizes`` (the last column unpadded when left-aligned)."""
    return _formatter(columns, sizes)(row)


def _formatter(columns: Sequence[Column], sizes: Sequence[int]) -> Callable[[Sequence[str]], str]:
    """:func:`line` for many rows: one format string, made once."""
    last = len(columns) - 1
    specs = [
        f"{{:>{size}}}" if c.align == ">" else "{}" if i == last else f"{{:<{size}}}"
        for i, (c, size) in enumerate(zip(columns, sizes, strict=True))
    ]
    fmt = "  ".join(specs).format
    return lambda row: fmt(*row).rstrip()


def render(
    rows: Iterable[Any], columns: Sequence[Column], *, header: bool = True, indent: str = ""
) -> list[str]:
    """The table's lines: the header (unless ``header`` is false) and one per row."""
    table = [cells(r, columns) for r in rows]
    sizes = widths(table, columns, header)
    fmt = _formatter(columns, sizes)
    out = [indent + fmt([c.title for c in columns])] if header else []
    out.extend(indent + fmt(row) for row in table)
    return out
