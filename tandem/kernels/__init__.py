"""Compute kernels: ``tandem.kernels.cpu`` (C++ extension, routed experts on the CPU)."""
