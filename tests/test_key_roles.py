"""A signature by a key the root lists for another role names that role (hole 7 of issue 10).

Saying "unknown key" of a director key on a bundle manifest sends the reader looking for a key
that is not in the root at all; the key is known, it just signs for something else.
"""

from __future__ import annotations

import pytest

from firmware_bundles import SigningKey, ThresholdError, build, verify
from tests.conftest import MODEL_BYTES, Keys, manifest_draft


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        ("director", "a director key, not a release key"),
        ("hil", "a hil key, not a release key"),
        ("root", "a root key, not a release key"),
        ("stranger", "unknown key, not a release key"),
    ],
    ids=["director", "hil", "root", "stranger"],
)
def test_a_key_of_another_role_on_a_manifest_is_named_by_its_role(
    keys: Keys, role: str, reason: str
) -> None:
    signer = SigningKey.generate() if role == "stranger" else getattr(keys, role)[0]
    bundle = build(manifest_draft(), {"model.onnx": MODEL_BYTES}, [keys.release[0], signer])
    with pytest.raises(ThresholdError) as refused:
        verify(bundle, keys.make_root()[0])
    assert refused.value.rejected == [(signer.keyid, reason)]
    assert reason in str(refused.value)
