"""The e2e fixtures (CRDs once per session, a namespace with the fake provider running)."""

from tests.e2e.conftest import bare_loop, crds

__all__ = ["bare_loop", "crds"]
