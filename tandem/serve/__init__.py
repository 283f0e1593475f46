"""HTTP serving: OpenAI- and Ollama-compatible APIs over one continuous-batching engine."""

__all__ = ["EngineLoop", "create_app"]


def __getattr__(name: str):
    # imported on use: the CLI registers `tandem serve` on machines without the server's packages (fastapi)
    if name == "create_app":
        from tandem.serve.app import create_app

        return create_app
    if name == "EngineLoop":
        from tandem.serve.loop import EngineLoop

        return EngineLoop
    raise AttributeError(f"module 'tandem.serve' has no attribute {name!r}")
