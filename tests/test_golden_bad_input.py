"""Bad pool input refused with a message naming the field: tests/golden/bad-*/bad-input.yaml.

Each case's ``expected-error.txt`` is the exact ManifestError a pool file gets (the operator
reports the same text in the CreditPool's Ready condition; the CRD refuses the same input with
its own enum / minimum / pattern / CEL rule, pinned in test_crds.py).
``SIDEPROXY_UPDATE_GOLDEN=1`` rewrites the expected files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from sideproxy.translate import ManifestError, from_manifests

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("SIDEPROXY_UPDATE_GOLDEN", "") not in ("", "0", "false")
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "bad-input.yaml").exists())
FIELDS = {
    "bad-cooldown-scope": "spec.cooldown.scope",
    "bad-quota-backoff": "spec.quota.backoffSeconds",
    "bad-quota-order": "spec.quota",
    "bad-model-glob": "spec.models.1",
}


def test_every_bad_case_is_listed() -> None:
    assert sorted(FIELDS) == CASES


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_naming_the_field(case: str) -> None:
    docs = list(yaml.safe_load_all((GOLDEN / case / "bad-input.yaml").read_text()))
    with pytest.raises(ManifestError) as excinfo:
        from_manifests(docs)
    message = str(excinfo.value) + "\n"
    assert FIELDS[case] in message
    assert "CANARY" not in message  # never the input's values
    expected = GOLDEN / case / "expected-error.txt"
    if UPDATE:
        expected.write_text(message)
    assert expected.read_text() == message
