"""GPU kernels (Triton) and the host-side helpers of GPU execution: quantized matmul and grouped MoE GEMM,
host functions on CUDA streams, weight streaming; attention and paged KV kernels."""
