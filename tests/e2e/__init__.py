"""End-to-end: the operator, proxy replicas and a fake provider as real processes, against the
real kube-apiserver of tests/kube (marker ``kube``), plus the pure pieces of the loop."""
