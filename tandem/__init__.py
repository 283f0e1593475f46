"""tandem: huge Mixture-of-Experts LLMs with routed experts on the CPU and the rest on the GPU."""

from tandem.llm import LLM, Generation, load

__all__ = ["LLM", "Generation", "load"]
__version__ = "0.1.0"
