"""Golden files for the translator: tests/golden/<case>/input.yaml -> expected outputs.

``SIDEPROXY_UPDATE_GOLDEN=1`` rewrites the expected files from the current translator; review
the diff like code. See tests/golden/README.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from sideproxy.models import PoolKeyStatus, fingerprint
from sideproxy.translate import KeyInput, Translation, from_manifests, translate

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z
UPDATE = os.environ.get("SIDEPROXY_UPDATE_GOLDEN", "") not in ("", "0", "false")
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "input.yaml").exists())


def _load(case: str) -> tuple[Translation, list[str]]:
    """The translation of a case, and every Secret value in its input (for the canary check)."""
    docs = [d for d in yaml.safe_load_all((GOLDEN / case / "input.yaml").read_text()) if d]
    pool, keys, secrets = from_manifests(docs)
    extra = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PoolKey"}
    # from_manifests() reads specs only; the operator also passes status and generation.
    keys = [
        KeyInput(
            k.name,
            k.spec,
            PoolKeyStatus.model_validate(extra[k.name]["status"])
            if extra[k.name].get("status")
            else None,
            extra[k.name]["metadata"].get("generation"),
        )
        for k in keys
    ]
    values = [v for data in secrets.values() for v in data.values() if v.strip()]
    return translate(pool, keys, secrets, NOW), values


def _verdicts(translation: Translation) -> dict[str, Any]:
    verdicts: dict[str, Any] = {}
    for name, v in sorted(translation.verdicts.items()):
        entry: dict[str, Any] = {"phase": v.phase.value, "reason": v.reason, "message": v.message}
        if v.fingerprint is not None:
            entry["fingerprint"] = v.fingerprint
        if v.cooldown_until is not None:
            entry["cooldownUntil"] = v.cooldown_until
        verdicts[name] = entry
    return {
        "verdicts": verdicts,
        "problems": list(translation.problems),
        # Key material by data key and fingerprint only.
        "material": {k: fingerprint(v) for k, v in sorted(translation.material.items())},
        "usableKeys": translation.usable_keys,
    }


def _render(translation: Translation) -> tuple[str, str]:
    table = translation.table.sealed(1).model_dump(by_alias=True, exclude_none=True, mode="json")
    table_text = json.dumps(table, indent=2) + "\n"
    verdict_text = yaml.safe_dump(_verdicts(translation), sort_keys=False, width=100)
    return table_text, verdict_text


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    translation, values = _load(case)
    table_text, verdict_text = _render(translation)
    table_path = GOLDEN / case / "expected-table.json"
    verdict_path = GOLDEN / case / "expected-verdicts.yaml"
    for text in (table_text, verdict_text):
        for value in values:
            assert value not in text, f"{case}: a key value reached the expected output"
    if UPDATE:
        table_path.write_text(table_text)
        verdict_path.write_text(verdict_text)
    assert table_path.exists(), f"no {table_path}: run with SIDEPROXY_UPDATE_GOLDEN=1"
    assert table_path.read_text() == table_text, f"{case}: table differs from the golden file"
    assert verdict_path.read_text() == verdict_text, f"{case}: verdicts differ from the golden file"


def test_every_case_is_checked() -> None:
    assert len(CASES) >= 13
    for case in CASES:
        assert (GOLDEN / case / "expected-table.json").exists(), case
        assert (GOLDEN / case / "expected-verdicts.yaml").exists(), case
