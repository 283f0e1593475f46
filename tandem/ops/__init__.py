"""Injectable operators: each replaces one module of a built model, runs on the devices its rule gives, and
materializes its own weights from the weight source in its kernel's layout. Looked up by name in `OPS`;
kernels (backends) by name in `BACKENDS`."""

from tandem.ops.base import LoadContext, OpConfig, RunState
from tandem.ops.registry import BACKENDS, DEVICE_KWARGS, OPS, Backend, OpSpec, register_backend, register_op, resolve

__all__ = ["BACKENDS", "DEVICE_KWARGS", "OPS", "Backend", "LoadContext", "OpConfig", "OpSpec", "RunState",
           "register_backend", "register_op", "resolve"]
