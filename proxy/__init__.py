"""openrouter-proxy: an OpenAI-compatible, streaming-aware gateway in front of OpenRouter.

Start reading at ``proxy.app`` (assembly) and ``proxy.pipeline`` (the request path).
"""

__version__ = "0.1.0"
