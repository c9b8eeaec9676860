"""The hot path's check-in answer equals the model-based canonical encoding, byte for byte."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime, timedelta, timezone

import pytest

from firmware_bundles import SigningKey, check_in
from firmware_bundles.check_in import check_in_answer
from firmware_bundles.messages import (
    MAX_NEXT_CHECK_IN_S,
    AssignedBundle,
    AssignmentSet,
    ShadowBundle,
)

#: Characters JSON escapes (or, DEL, that one encoder might), or that are multi-byte in UTF-8.
_AWKWARD = '"\\/\n\t\x01\x1f\x7f\u00e9\u4e2d\U0001f600<>&'


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + _AWKWARD) for _ in range(n))


def _ident(rng: random.Random) -> str:
    return rng.choice(string.ascii_letters) + "".join(
        rng.choice(string.ascii_letters + string.digits + "._:-") for _ in range(rng.randint(0, 40))
    )


def _time(rng: random.Random) -> datetime:
    offset = timezone(timedelta(minutes=rng.choice([0, 0, 60, -300, 330])))
    moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(
        seconds=rng.randint(0, 10**8), microseconds=rng.choice([0, rng.randint(0, 999_999)])
    )
    return moment.astimezone(offset)


def _shadow(rng: random.Random) -> ShadowBundle:
    return ShadowBundle(
        version=_text(rng, rng.randint(0, 8)),
        bundle_sha256="".join(rng.choice("0123456789abcdef") for _ in range(64)),
        bundle_length=rng.randint(1, 2**40),
        release_counter=rng.randint(0, 2**31),
        download_url="/v1/bundles/" + _text(rng, rng.randint(0, 20)),
        sample_fraction=rng.choice([1.0, 0.5, rng.random() or 0.25, 1e-7]),
    )


def _random_set(rng: random.Random) -> dict[str, object]:
    issued = _time(rng)
    models = {_text(rng, rng.randint(1, 12)) for _ in range(rng.randint(0, 5))}
    return {
        "device_id": _ident(rng),
        "hardware_id": _ident(rng),
        "nonce": "".join(rng.choice("0123456789abcdef") for _ in range(rng.choice([32, 64, 128]))),
        "issued_at": issued,
        "expires_at": issued + timedelta(seconds=rng.randint(1, 10**6), microseconds=7),
        "bundles": [
            AssignedBundle(
                model=model,
                version=_text(rng, rng.randint(0, 8)),
                bundle_sha256="".join(rng.choice("0123456789abcdef") for _ in range(64)),
                bundle_length=rng.randint(1, 2**40),
                release_counter=rng.randint(0, 2**31),
                download_url="/v1/bundles/" + _text(rng, rng.randint(0, 20)),
                confirmed_release_counter=rng.choice([None, rng.randint(0, 2**31)]),
                shadow=rng.choice([None, _shadow(rng)]),
            )
            for model in sorted(models)
        ],
        "withheld": {
            _text(rng, rng.randint(1, 6)): _text(rng, rng.randint(0, 30))
            for _ in range(rng.randint(0, 3))
        },
        "next_check_in_s": rng.randint(1, MAX_NEXT_CHECK_IN_S),
    }


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("encoder", ["orjson", "json"])
def test_fast_answer_equals_the_signed_model(
    seed: int, encoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if encoder == "json":  # as where orjson is not installed
        monkeypatch.setattr(check_in, "orjson", None)
    rng = random.Random(seed)
    key = SigningKey.generate()
    for _ in range(50):
        fields = _random_set(rng)
        expected = AssignmentSet.model_validate(fields).sign(key).to_bytes()
        assert check_in_answer(key, **fields) == expected  # type: ignore[arg-type]


def test_a_timestamp_without_a_timezone_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        check_in_answer(
            SigningKey.generate(),
            device_id="d",
            hardware_id="h",
            nonce="0" * 32,
            issued_at=datetime(2026, 1, 1),
            expires_at=datetime(2026, 1, 2, tzinfo=UTC),
            bundles=[],
            withheld={},
            next_check_in_s=60,
        )
