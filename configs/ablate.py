"""Ablation sweeps of speculative decoding (specdec_jax/sweep.py has the details).

    python -m experiments.run --config=configs/ablate.py:quick      # ~13 min here
    python -m experiments.run --config=configs/ablate.py            # the paper sweep (TPU)
    python -m experiments.run --config=configs/ablate.py:dynamic    # issue #17's table
    python -m experiments.run --config=configs/ablate.py:tree       # trees vs chains (#18)
    python -m experiments.run --config=configs/ablate.py:batch
    python -m experiments.run --config=configs/ablate.py:drafter_size
    python -m experiments.run --config=configs/ablate.py:tiny       # random tiny model, seconds

Each run writes `output/` with raw.jsonl (one line per point and prompt),
results.csv and results.md (one row per point: ms/token, tok/s, speedup over
AR measured in the same run, tokens per target call, acceptance rate and per
position, the Leviathan prediction from the measured α, c and v, and the
quality columns: greedy outputs identical to AR, the PIT p-value of sampled
tokens, the target's log-likelihood next to AR's) and PNG plots, and prints
a JSON summary as its last line. An existing results folder is refused unless
`--config.overwrite=True` (replace) or `--config.resume=True` (continue). Any list can be overridden as a comma string:
`--config.draft_lens=2,4 --config.drafters=ngram,mtp`. Drafters are ngram,
draft_model[:<layers>|target], mtp[:<folder>], heads[:<folder>], and
mtp+lookup / heads+lookup (prompt lookup of `lookup`+ tokens first, the
trained drafter for rows without such a match).

Variants:
  (none)        draft_len 1,2,3,4,6,8,16 x drafter ngram, draft_model, mtp, heads x
                T 0, 0.7, 1.0 on code, prose, chat (16 prompts x 128 tokens each),
                batch 1: the paper table. ~250 compiled programs; hours on this CPU.
  quick         k 2,4,8 x ngram, mtp x T 0, 1.0 on code, prose, chat, 2 prompts x 32
                tokens per domain: 13.4 min on this 2-core CPU (docs/BENCHMARKS.md).
                Adding heads (--config.drafters=ngram,mtp,heads) adds ~3 min.
  dynamic       mtp, ngram at k 2,4,8, fixed and with the dynamic draft-length
                policy (points '<drafter> dynamic', drafting at most k) x T 0, 1.0 on
                code, prose, chat, 4 prompts x 64 tokens per domain.
  tree          mtp, ngram: chains at k 2,4, trees auto, 2x2x1, 4x1x1 and each
                tree's chain at equal verify rows x T 0, 1.0,
                2 prompts x 32 tokens per domain.
  batch         batch 1, 4, 16 at k=4, greedy: how the gain shrinks as the verify
                pass stops being memory-bound (16 prompts per domain).
  drafter_size  drafters from 0 parameters (ngram) through the trained 3.6M mtp and
                4.8M heads to the target itself (draft_model:target, 268M, every
                draft accepted) at k 2,4. Add trained sizes as mtp:<folder>, e.g.
                --config.drafters=ngram,mtp,mtp:outputs/mtp_2layer/drafter after
                python -m experiments.run --config=configs/train_mtp.py \
                    --config.num_layers=2 --config.workdir=outputs/mtp_2layer
  tiny          the random tiny model with ngram, draft_model and draft_model:target
                (for tests and CI).
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = 'sweep'
  c.model = 'gemma3_270m'
  c.gguf = ''
  c.param_dtype = 'auto'              # weights: auto | bfloat16 | float32 (exact; parity)
  c.dtype = 'float32'                 # activations: float32 | bfloat16 (TPU/GPU only)
  c.output = 'outputs/ablate'
  c.overwrite = False                 # replace the results in output
  c.resume = False                    # keep the points complete in output/raw.jsonl, run the rest
  # Several processes ('' / 0 / -1 = the JAX_* variables): process 0 runs and writes.
  c.coordinator_address = ''
  c.num_processes = 0
  c.process_id = -1
  c.coordinator_timeout = 300
  c.prompt_dir = ''                   # '' = experiments/prompts/<domain>.jsonl
  c.domains = 'code,prose,chat'
  c.prompts_per_domain = 16
  c.max_prompt_len = 0                # 0 = whole prompts; else BOS + the last n - 1 tokens
  c.max_new_tokens = 128
  c.repeats = 1                       # timed runs per batch (median)
  c.seed = 0
  c.drafters = 'ngram,draft_model,mtp,heads'
  c.draft_lens = '1,2,3,4,6,8,16'
  c.temperatures = '0,0.7,1.0'
  c.batch_sizes = '1'
  c.max_ngram = 3
  c.min_ngram = 1                     # ngram: shorter matches abstain (an AR step)
  c.lookup = 2                        # mtp+lookup / heads+lookup: the shortest match looked up
  c.lookup_unsure = 0.7               # ... and shorter matches where the drafter is less sure
  c.lookup_sampled_min = 1.0          # ... sampling: lookup only where the drafter gives its token >= this
  # Fixed k and / or the dynamic draft-length policy (specdec_jax/policy.py),
  # whose points are labelled '<drafter> dynamic' and draft at most k.
  c.dynamic = 'false'                 # 'false', 'true' or 'false,true'
  c.policy_ks = ''                    # dynamic: lengths it may choose ('' = 1, 2, 4, ... k)
  c.costs = ''                        # dynamic: '' = measured once per program (cached)
  # Tree drafting (specdec_jax/tree.py): '' = none; else comma-separated
  # shapes, each 'auto' (the drafter's measured best) or a branching per depth
  # written with x ('2x2x1'). Each tree is a point '<drafter> tree 2x2x1' and
  # comes with the drafter's chain at the same verify rows (k = nodes - 1);
  # results.md's k column shows a tree's rows, and tree_vs_chain_*.png plot
  # both against verify rows. Drafters that cannot draft a shape skip it.
  c.trees = ''
  c.confidence_threshold = 0.4
  c.acceptance_prior = 0.6
  c.acceptance_decay = 0.7
  arg = arg or 'full'
  if arg == 'full':
    pass
  elif arg == 'quick':
    c.output = 'outputs/ablate_quick'
    c.drafters = 'ngram,mtp'
    c.draft_lens = '2,4,8'
    c.temperatures = '0,1.0'
    c.prompts_per_domain = 2
    c.max_new_tokens = 32
  elif arg == 'dynamic':
    # Issue #17: the policy vs fixed k, greedy and T = 1, every domain.
    c.output = 'outputs/ablate_dynamic'
    c.drafters = 'mtp,ngram'
    c.draft_lens = '2,4,8'
    c.dynamic = 'false,true'
    c.temperatures = '0,1.0'
    c.prompts_per_domain = 4
    c.max_new_tokens = 64
  elif arg == 'tree':
    # Issue #18: trees vs chains at equal verify rows, greedy and T = 1.
    c.output = 'outputs/ablate_tree'
    c.drafters = 'mtp,ngram'
    c.draft_lens = '2,4'
    c.trees = 'auto,2x2x1,4x1x1'
    c.temperatures = '0,1.0'
    c.prompts_per_domain = 2
    c.max_new_tokens = 32
  elif arg == 'batch':
    c.output = 'outputs/ablate_batch'
    c.drafters = 'ngram,mtp,heads'
    c.draft_lens = '4'
    c.temperatures = '0'
    c.batch_sizes = '1,4,16'
  elif arg == 'drafter_size':
    c.output = 'outputs/ablate_drafter_size'
    c.drafters = 'ngram,mtp,heads,draft_model:target'
    c.draft_lens = '2,4'
    c.temperatures = '0'
  elif arg == 'tiny':
    c.model = 'tiny'
    c.output = 'outputs/ablate_tiny'
    c.domains = 'code,prose'
    c.drafters = 'ngram,draft_model,draft_model:target'
    c.draft_lens = '1,3'
    c.temperatures = '0,1.0'
    c.prompts_per_domain = 3
    c.max_prompt_len = 24
    c.max_new_tokens = 12
  else:
    raise ValueError(f'unknown variant {arg!r}: use quick, dynamic, tree, batch, drafter_size or tiny')
  return c
