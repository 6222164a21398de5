"""Scenario 6 (placeholder): cluster propagation of a cool-down.

What it will measure: the time from a 429 answered to one proxy replica until every replica of
the pool avoids that key (replica -> PoolKey Event -> operator -> routing table ConfigMap ->
every replica's watch -> swapped table), as p50/p99 over repeated trials against a real
kube-apiserver (scripts/build-k8s.sh), with the fake provider limiting one key.

The cluster loop (operator writing cool-downs into the routing table) is not built yet, so this
exits with status 3 and "not available yet"; bench/harness.py records the scenario as
"not measured yet". Once it exists, print one JSON object on stdout and exit 0.
"""

import sys

if __name__ == "__main__":
    print("scenario 6 (cluster propagation): not available yet - the cluster loop is not built")
    sys.exit(3)
