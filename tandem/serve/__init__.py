"""HTTP serving: OpenAI- and Ollama-compatible APIs over one continuous-batching engine."""

from tandem.serve.app import create_app
from tandem.serve.loop import EngineLoop

__all__ = ["EngineLoop", "create_app"]
