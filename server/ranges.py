"""Byte ranges of downloads as RFC 9110 section 14 has them: a ``Range`` the server cannot parse
(another unit, bad syntax, a last position before the first) is ignored and the whole
representation served (200); 416 only when the header parses and no range in it is satisfiable.

Starlette's :class:`~starlette.responses.FileResponse` answers 400 to a malformed header and 416
when any one range is out of bounds; :class:`RangeFileResponse` hands it ranges parsed here.
"""

from __future__ import annotations

import re

from starlette.responses import FileResponse, RangeNotSatisfiable

#: ``first-last``, ``first-`` or ``-suffix``, digits only (RFC 9110 ``int-range``/``suffix-range``).
_SPEC = re.compile(r"(\d+)-(\d*)|-(\d+)")
#: More ranges than this in one header is ignored: a client resuming asks for one.
MAX_RANGES = 100
#: Positions longer than this are past any file (and int() of thousands of digits is refused).
_MAX_DIGITS = 30


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """The satisfiable ranges of ``header`` as ``[start, end)`` pairs, sorted and merged, or None
    when the header is to be ignored.

    Raises:
        RangeNotSatisfiable: When it parses but no range starts inside ``size`` bytes.
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in specs.split(",")]
    if len(parts) > MAX_RANGES:
        return None
    ranges = []
    for part in parts:
        match = _SPEC.fullmatch(part)
        if match is None:
            return None
        first_digits, last_digits, suffix_digits = match.groups()
        if suffix_digits is not None:
            suffix = _position(suffix_digits)
            if suffix > 0 and size > 0:
                ranges.append((max(size - suffix, 0), size))
            continue
        first = _position(first_digits)
        last = _position(last_digits) if last_digits else None
        if last is not None and last < first:
            return None
        if first < size:
            ranges.append((first, size if last is None else min(last + 1, size)))
    if not ranges:
        raise RangeNotSatisfiable(size)
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class RangeFileResponse(FileResponse):
    """A file with ``Range`` handled by :func:`parse_ranges` (an ignored header gives 200)."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # Starlette serves the whole file for an empty list.
        return parse_ranges(http_range, file_size) or []
