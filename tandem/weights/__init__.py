"""Weight sources: name -> lazily materialized tensor, memory-mapped from the checkpoint files."""

from tandem.weights.loader import materialize
from tandem.weights.safetensors import MissingTensorError, SafetensorsSource, TensorInfo, WeightError

__all__ = ["MissingTensorError", "SafetensorsSource", "TensorInfo", "WeightError", "materialize"]
