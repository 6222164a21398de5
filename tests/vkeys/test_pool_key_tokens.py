"""PoolKey.status counts tokens too: the proxy reports per key, the operator folds exactly once."""

from __future__ import annotations

from sideproxy.operator._fold import Source, fold_counts
from sideproxy.pool import KeyConfig, ManagedCreditPool
from sideproxy.proxy._ledger import Ledger
from sideproxy.wire import KeyCounts, KeyReport


def _source(report: str, prompt: int, completion: int, uid: str = "u1") -> Source:
    counts = KeyCounts(prompt_tokens=prompt, completion_tokens=completion)
    return Source(report, uid, 1.0, KeyReport(name="k1", fingerprint="ab12cd34", counts=counts))


def test_the_fold_sums_tokens_once_per_report_and_survives_restarts() -> None:
    first = fold_counts({}, [_source("p-a", 10, 4), _source("p-b", 1, 1)], (), now=1.0)
    assert (first["promptTokens"], first["completionTokens"]) == (11, 5)
    again = fold_counts(first, [_source("p-a", 10, 4), _source("p-b", 1, 1)], (), now=1.0)
    assert (again["promptTokens"], again["completionTokens"]) == (11, 5)  # no double count
    restarted = fold_counts(again, [_source("p-a", 2, 1)], (), now=1.0)  # p-a from 0 again
    assert restarted["promptTokens"] == 10 + 1 + 2
    gone = fold_counts(restarted, [], ("p-a", "p-b"), now=1.0)  # deleted: marks fold in
    assert gone["promptTokens"] == 13


def test_the_ledger_reports_the_tokens_a_key_served() -> None:
    pool = ManagedCreditPool([KeyConfig("k1", "groq", "sk-1"), KeyConfig("k2", "groq", "sk-2")])
    ledger = Ledger()
    ledger.tokens = {"k1": [30, 12]}
    spec = ledger.spec("p", "r-1", 1.0, pool.statuses(1.0))
    counts = {entry.name: entry.counts for entry in spec.keys}
    assert (counts["k1"].prompt_tokens, counts["k1"].completion_tokens) == (30, 12)
    assert "k2" not in counts  # nothing to say about an idle key
