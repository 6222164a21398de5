"""Control-plane chaos: bad configuration and control-plane faults on the real API server."""
