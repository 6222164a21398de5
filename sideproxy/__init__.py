"""Side Proxy: N LLM API keys behind one OpenAI-compatible virtual key."""

__version__ = "0.1.0"
