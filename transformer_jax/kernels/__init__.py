"""CPU kernels that XLA:CPU lacks, built for the host on first use (see :mod:`.cpu_build`).

:mod:`.skinny_matmul`: products of a few rows (decoding steps) that read bfloat16 weights at memory speed.
:mod:`.transpose`: a 2-D transpose that XLA cannot fold into the product after it (bf16 weight gradients).
Both are used through :mod:`transformer_jax.modules.dot`.
:mod:`.attention`: attention and its gradient with each head's logits kept in cache, the default attention path of
:func:`transformer_jax.modules.attention.dot_product_attention` on a CPU."""
