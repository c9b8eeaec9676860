"""Range requests on bundle downloads as RFC 9110 section 14 has them: a Range the server cannot
parse is ignored (the whole bundle, 200), and only an unsatisfiable one gets 416."""

from __future__ import annotations

from collections.abc import Callable

from tests.cases import named_cases
from tests.server.conftest import Fleet

Span = Callable[[int], tuple[int, int]]
WHOLE: Span = lambda n: (0, n)  # noqa: E731
#: (name, Range header for a bundle of n bytes, status, the [start, end) served, or None).
CASES: list[tuple[str, Callable[[int], str], int, Span | None]] = [
    ("first-ten", lambda n: "bytes=0-9", 206, lambda n: (0, 10)),
    ("open-end", lambda n: "bytes=5-", 206, lambda n: (5, n)),
    ("suffix", lambda n: "bytes=-10", 206, lambda n: (n - 10, n)),
    ("suffix-longer-than-file", lambda n: f"bytes=-{n + 100}", 206, WHOLE),
    ("end-past-file", lambda n: f"bytes=10-{n * 2}", 206, lambda n: (10, n)),
    ("unit-case-and-spaces", lambda n: "Bytes = 3-4", 206, lambda n: (3, 5)),
    ("last-byte", lambda n: f"bytes={n - 1}-", 206, lambda n: (n - 1, n)),
    ("huge-end", lambda n: "bytes=0-" + "9" * 400, 206, WHOLE),
    ("one-satisfiable-of-two", lambda n: f"bytes={n + 5}-,0-3", 206, lambda n: (0, 4)),
    ("not-a-number", lambda n: "bytes=abc", 200, WHOLE),
    ("backwards", lambda n: "bytes=5-2", 200, WHOLE),
    ("other-unit", lambda n: "items=0-5", 200, WHOLE),
    ("no-equals", lambda n: "bytes", 200, WHOLE),
    ("empty-set", lambda n: "bytes=", 200, WHOLE),
    ("lone-dash", lambda n: "bytes=-", 200, WHOLE),
    ("one-bad-spec-of-two", lambda n: "bytes=0-5,x", 200, WHOLE),
    ("negative-start", lambda n: "bytes=-5-10", 200, WHOLE),
    ("trailing-garbage", lambda n: "bytes=0-5x", 200, WHOLE),
    ("plus-sign", lambda n: "bytes=+1-5", 200, WHOLE),
    ("start-at-length", lambda n: f"bytes={n}-", 416, None),
    ("start-past-length", lambda n: f"bytes={n + 5}-{n + 10}", 416, None),
    ("zero-suffix", lambda n: "bytes=-0", 416, None),
    ("all-unsatisfiable", lambda n: f"bytes={n}-,{n + 1}-", 416, None),
]


@named_cases(("header", "status", "span"), CASES)
def test_range_header_table(
    fleet: Fleet, header: Callable[[int], str], status: int, span: Span | None
) -> None:
    data = fleet.bundle()
    bundle_sha256 = fleet.publish(data)["sha256"]
    cred = fleet.enroll("phone-1")
    n = len(data)
    r = fleet.client.get(
        f"/v1/bundles/{bundle_sha256}", headers={**fleet.auth(cred), "Range": header(n)}
    )
    assert r.status_code == status, (r.status_code, r.text[:200])
    if span is None:
        assert r.headers["content-range"] == f"bytes */{n}"
        return
    start, end = span(n)
    assert r.content == data[start:end]
    if status == 206:
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{n}"
    else:
        assert "content-range" not in r.headers
