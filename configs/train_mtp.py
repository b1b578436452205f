"""Train the Gemma-4-style MTP drafter for Gemma 3 270M (the shipped drafter).

    python -m experiments.run --config=configs/train_mtp.py
    python -m experiments.run --config=configs/train_mtp.py:tiny   # tiny random target, ~1 min
    python -m experiments.run --config=configs/train_mtp.py \
        --config.shards=outputs/distill/gemma3_270m --config.workdir=outputs/train_mtp_distill
        # the target's own continuations (configs/distill_data.py) instead of `data`

Data: Python standard-library sources (code) and the Python documentation's
reST sources (prose; `sh tools/fetch_corpora.sh` unpacks Debian's
python3.11-doc into ~/.cache/specdec_jax/corpora). Evaluation prompts
(HumanEval stubs, fortunes) are not in it. The target's features are
computed once and cached; checkpoints go to `workdir` every
`checkpoint_every` steps and a rerun resumes from the newest. Progress,
held-out accuracy per block position and an ETA go to stderr and
`workdir/log.jsonl`; the summary JSON is the last stdout line. The exported
drafter (`output`) is what configs/generate.py loads.
"""
import ml_collections

STDLIB_CODE = '{stdlib}/**/*.py'
PYDOC_PROSE = '{corpora}/python3.11-doc/usr/share/doc/python3.11/html/_sources/**/*.rst.txt'


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = 'train_drafter'
  c.model = 'gemma3_270m'       # the target; 'tiny' = random tiny model, byte tokenizer
  c.gguf = ''
  c.param_dtype = 'auto'        # the target's weights: auto | bfloat16 | float32
  c.dtype = 'float32'           # activations
  c.target_seed = 0             # model=tiny: its random weights
  c.drafter = 'mtp'             # mtp | heads
  c.num_layers = 1              # mtp decoder layers
  c.width = 512                 # mtp layer width
  c.hidden_dim = 1024           # GeGLU width (mtp layers, each head's MLP)
  c.num_heads = 4               # mtp query heads
  c.draft_vocab_size = 4096     # reduced output vocabulary (most frequent target tokens)
  c.depth = 4                   # block positions trained (heads: the number of heads)
  c.loss = 'ce'                 # ce (target's greedy tokens) | kl (target's top-16 distribution)
  c.data = (STDLIB_CODE, PYDOC_PROSE)
  c.seq_len = 256
  # Self-distilled data (configs/distill_data.py's folder) instead of the
  # teacher-forced features of `data`; held-out rows by prompt source.
  c.shards = ''                # a folder, or several comma-separated (other seeds)
  c.shard_count = 0             # use the first N shards (0: all listed at start)
  c.shard_rows_kind = 'all'     # all | greedy | sampled rows
  c.max_tokens = 120_000        # training tokens (held-out adds heldout_fraction of it)
  c.heldout_fraction = 0.03
  c.feature_batch_size = 4
  c.batch_size = 8
  c.steps = 500
  c.learning_rate = 2e-3
  c.warmup_steps = 40
  c.weight_decay = 0.01
  c.seed = 0
  c.checkpoint_every = 50
  c.eval_every = 50
  c.eval_rows = 64
  c.log_every = 10
  c.stop_at_step = 0            # > 0: stop after this step's checkpoint (resume later)
  # An exported drafter folder to continue training from (its weights and
  # reduced vocabulary; the shape keys above must match it), e.g. the shipped
  # specdec_jax/assets/gemma3_270m_mtp; '' = a fresh random drafter.
  c.init_from = ''
  c.workdir = 'outputs/train_mtp'
  c.output = 'outputs/train_mtp/drafter'
  c.export_dtype = 'float16'    # storage dtype of the exported weights
  c.export = 'best'             # best: the held-out evaluation with most expected accepted drafts; last
  if arg == 'tiny':
    c.model = 'tiny'
    c.data = ('{stdlib}/json/*.py', '{stdlib}/email/*.py')
    c.width, c.hidden_dim, c.num_heads, c.draft_vocab_size = 32, 64, 4, 128
    c.seq_len, c.max_tokens, c.heldout_fraction = 64, 40_000, 0.1
    c.batch_size, c.steps, c.learning_rate, c.warmup_steps = 16, 120, 3e-3, 10
    c.checkpoint_every, c.eval_every, c.eval_rows, c.log_every = 40, 40, 64, 20
    c.workdir = 'outputs/train_mtp_tiny'
    c.output = 'outputs/train_mtp_tiny/drafter'
    c.export_dtype = 'float32'
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (use :tiny or nothing)')
  return c
