"""tandem: huge Mixture-of-Experts LLMs with routed experts on the CPU and the rest on the GPU."""

import os

# torch's OpenMP workers spin ~300k iterations after each parallel op (libgomp's default) on the cores where the
# experts kernel's pool computes next: 2.5x slower MoE decode on 2 cores. Read when torch loads; set it to override.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from tandem.llm import LLM, Generation, load  # noqa: E402

__all__ = ["LLM", "Generation", "load"]
__version__ = "0.1.0"
