"""The default job: a small character-level GPT on the Python reference docs (``pydoc_data.topics``), a few
minutes on two CPU cores. Every other preset starts from this one."""

import ml_collections
from ml_collections import config_dict

from train.configs import model_fields
from transformer_jax import GPTConfig


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Which model family and objective: 'lm' (GPT), 'translation' (encoder-decoder), 'mlm' or 'classify' (BERT).
  config.task = 'lm'
  # Seeds parameter init, dropout and the data order.
  config.seed = 0
  # Start from pretrained weights: a Hugging Face directory (config.json, model.safetensors and the tokenizer files,
  # as save_pretrained writes them; GPT-2, Llama, Mistral or Qwen2 for lm, BERT for mlm and classify, BART, Marian or
  # T5 for translation) or the workdir of an earlier run. The architecture and the tokenizer then come from there
  # (data.vocab is not used); model.* may change only runtime fields (dropout rates, dtypes, scan_layers,
  # remat_policy). '' trains from scratch.
  config.init_from = ''

  config.data = ml_collections.ConfigDict()
  # A UTF-8 text file, a folder of them, or 'builtin' (the Python reference docs, no download). A .jsonl file
  # holds one document per line, as {"text": ...} records.
  config.data.path = 'builtin'
  # The field of a .jsonl record that holds its text.
  config.data.text_field = 'text'
  # 'char', 'byte', 'word' or 'bpe' (trained with `tokenizers`); saved as vocab.json in the workdir.
  config.data.vocab = 'char'
  # Vocabulary size of a 'bpe' vocab, specials included.
  config.data.bpe_vocab_size = 4096
  # The tail of the token stream held out for evaluation.
  config.data.val_fraction = 0.05
  # Tokens per training sequence (at most model.max_len). 64 characters: twice the steps of 128 in the same time,
  # and in a few minutes the number of steps, not the context, limits the loss.
  config.data.seq_len = 64

  config.model = model_fields(
    GPTConfig,
    num_layers=4,
    d_model=128,
    num_heads=4,
    d_ff=512,
    max_len=64,  # longest sequence; >= data.seq_len
    position_encoding='none',
    rope_theta=10000.0,  # rotary positions: out of the loss plateau in a third of the steps learned positions take
    dropout_rate=0.0,  # 1,500 steps see each token about 3 times: nothing to overfit yet
    attention_dropout_rate=0.0,
    dtype='float32',  # compute dtype: 'bfloat16' on accelerators; parameters stay float32 (param_dtype)
  )

  config.lora = ml_collections.ConfigDict()
  # LoRA: rank > 0 freezes the model's weights and trains low-rank adapters on the projections that `targets` names
  # (a regular expression over module paths in whole parts: query, key, value, out, qkv (GPT-2's fused one),
  # fc_in, fc_gate, fc_out, output). Only the adapters get gradients and optimizer state; checkpoints hold them
  # alone, and train.export merges them or writes a PEFT adapter directory.
  config.lora.rank = 0
  config.lora.alpha = 16.0  # the update is (alpha / rank) * x A B
  config.lora.dropout = 0.0  # on the adapters' input
  config.lora.targets = 'query|value|qkv'
  # Modules trained in full beside the adapters (PEFT's modules_to_save), e.g. 'classifier'; what init_from leaves
  # new (a classification head) always is.
  config.lora.train_also = ''

  # Sequences per optimizer step (split over grad_accum_steps micro-batches).
  config.batch_size = 16
  # Micro-batches per step: the gradient of the whole batch, at the memory of one micro-batch.
  config.grad_accum_steps = 1
  # Optimizer steps of this run; re-running with a larger value continues a finished run.
  config.num_train_steps = 1500
  # Length of the learning-rate schedule; 0 means num_train_steps.
  config.decay_steps = 0

  # Peak learning rate, reached after warmup_steps.
  # 2e-3: 5e-3 and above keep this model on the plateau near 2.2 nats for hundreds of steps.
  config.learning_rate = 2e-3
  # Other peak learning rates by parameter path, 'PATTERN=LR,...': a regular expression matched against the start of
  # paths such as bert/encoder/layers_0/ffn/fc_in/kernel, in whole parts ('classifier' is classifier/kernel and
  # classifier/bias); the first match wins, the rest take learning_rate. Each follows the same warmup and decay;
  # 0 freezes. E.g. 'classifier=1e-3,bert/(token_embed|positions|token_type_embed|embed_norm)=0'.
  config.param_lr = ''
  config.warmup_steps = 50
  # 'cosine', 'linear', 'constant' or 'rsqrt' (the original Transformer's inverse square root).
  config.lr_schedule = 'linear'
  # Final learning rate of 'cosine'/'linear' as a fraction of the peak.
  config.end_lr_ratio = 0.0
  # AdamW; decay applies to kernels only, never to biases, norms or embeddings.
  config.weight_decay = 0.1
  config.adam_b1 = 0.9
  config.adam_b2 = 0.99
  config.adam_eps = 1e-8
  # Gradients are rescaled to at most this global norm; 0 disables clipping.
  config.grad_clip_norm = 1.0
  # Target mass spread uniformly over the vocabulary; padding never counts.
  config.label_smoothing = 0.0
  # A non-finite loss or gradient: False stops the run (last good checkpoint kept), True skips that update.
  config.skip_nonfinite_updates = False

  # Progress line, TensorBoard and metrics.jsonl every this many steps.
  config.log_every_steps = 50
  # Evaluate on the held-out split every this many steps (and at the end).
  config.eval_every_steps = 250
  # Batches of the held-out split per evaluation; 0 = all of it (the loss of a few batches from its start says
  # little: the built-in corpus's split opens with a table of dashes and spaces).
  config.eval_batches = 0
  # Save every this many steps (and at the end, and on SIGTERM/SIGINT).
  config.checkpoint_every_steps = 500
  # Checkpoints kept: the newest keep_last plus the keep_best with the best validation metric.
  config.keep_last = 2
  config.keep_best = 1
  # Where compiled programs are cached across runs; '' = ~/.cache/transformer_jax/jax (or $XDG_CACHE_HOME).
  config.compilation_cache_dir = ''

  # How the run spreads over devices: 'jit' (one program over the mesh below) or 'pmap' (per-device data
  # parallelism, JAX's older API, kept in maintenance; mesh.fsdp and mesh.tensor must then be 1).
  config.parallelism = 'jit'
  # The model API the run trains: 'linen' (init/apply, an optax state) or 'nnx' (the same model as a Flax NNX
  # module, an nnx.Optimizer and an nnx.jit step; parallelism='jit', no LoRA yet). Same losses, same checkpoints:
  # a run may resume under the other API.
  config.api = 'linen'
  config.mesh = ml_collections.ConfigDict()
  # Devices per mesh axis; one may be -1 (all the devices the others leave). The batch splits over data x fsdp;
  # fsdp also splits the parameters and optimizer state; tensor splits heads, FFN units and the vocabulary. data
  # unset (null) takes what fsdp and tensor leave: every device by default (data parallel, as the -1 in older
  # runs' config.json), 1 when one of them is -1 (so --config.mesh.fsdp=-1 alone is FSDP over every device).
  config.mesh.data = config_dict.placeholder(int)
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.distributed = ml_collections.ConfigDict()
  # Multi-process runs: True on a TPU pod, Slurm or Open MPI (JAX finds the processes itself); elsewhere set the
  # three fields below (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every process.
  config.distributed.enabled = False
  config.distributed.coordinator_address = ''  # host:port of process 0
  config.distributed.num_processes = 0
  config.distributed.process_id = -1

  config.sample = ml_collections.ConfigDict()
  # Show what the model does at the end of the run (for lm: a prompt, then sampled tokens).
  config.sample.enabled = True
  config.sample.prompt = 'The '
  config.sample.max_new_tokens = 300
  config.sample.temperature = 0.8
  config.sample.top_k = 0  # 0: no top-k filtering
  return config
