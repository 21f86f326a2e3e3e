"""CPU kernels that XLA:CPU lacks, built for the host on first use (see :mod:`.cpu_build`).

:mod:`.skinny_matmul`: products of a few rows (decoding steps) that read bfloat16 weights at memory speed."""
