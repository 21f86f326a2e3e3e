"""CPU kernels that XLA:CPU lacks, built for the host on first use (see :mod:`.cpu_build`).

Products, through :mod:`transformer_jax.modules.dot`:
:mod:`.skinny_matmul`: products of a few rows (decoding steps) that read bfloat16 weights at memory speed.
:mod:`.mkl_matmul`: float32 products by Intel MKL, on Intel CPUs where they beat XLA's.
:mod:`.transpose`: a 2-D transpose that XLA cannot fold into the product after it (bf16 weight gradients).

Layers, each the default path of its module on a single CPU device:
:mod:`.attention`: attention and its gradient with each head's logits kept in cache
(:func:`transformer_jax.modules.attention.dot_product_attention`).
:mod:`.norm`: layer and RMS normalisation, one pass a row each way (:mod:`transformer_jax.modules.normalization`).
:mod:`.cross_entropy` and :mod:`.argmax`: the loss and greedy decoding's choice, each row of logits read once
(:mod:`transformer_jax.modules.cross_entropy`, :mod:`transformer_jax.modules.argmax`).
:mod:`.take_rows`: rows of a 16-bit table (:mod:`transformer_jax.modules.take`).
:mod:`.materialize`: an opaque no-op that makes XLA write the residual stream's gradient once per layer."""
