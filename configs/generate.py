"""Generate continuations with the Gemma 3 270M target.

    python -m experiments.run --config=configs/generate.py
    python -m experiments.run --config=configs/generate.py \
        --config.prompts=prompts.jsonl --config.temperature=0.7 --config.top_p=0.9

`prompts` is a JSONL file, one `{"prompt": "text"}` or `{"prompt_ids": [...]}`
(BOS included by you) per line; empty runs three built-in demo prompts.
Writes `output` (one JSON line per prompt and sample) and prints a JSON
summary as the last stdout line. On this 2-core CPU the demo takes ~1 min
(~25 s load + compile) at ~15 tok/s; `model=tiny` runs a random tiny model
with a byte tokenizer in seconds (for tests). An existing output is refused
unless `--config.resume=true` (continue it) or `--config.overwrite=true`.
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.job = 'generate'
  c.model = 'gemma3_270m'     # or 'tiny'
  c.gguf = ''                 # a Gemma 3 GGUF path; empty = the packaged 270M
  c.param_dtype = 'auto'      # weights: auto | bfloat16 | float32 (exact; parity)
  c.dtype = 'float32'         # activations: float32 | bfloat16 (TPU/GPU only)
  c.prompts = ''              # JSONL path; empty = built-in demo prompts
  c.output = 'outputs/generate.jsonl'
  c.max_new_tokens = 64
  c.temperature = 0.0         # 0 = greedy
  c.top_k = 0                 # 0 = off
  c.top_p = 1.0               # 1 = off
  c.seed = 0
  c.batch_size = 1
  c.num_samples = 1
  c.cache_size = 0            # KV slots per row; 0 = smallest that fits (x128)
  # auto = the trained MTP drafter shipped for the model (Gemma 3 270M) behind
  # prompt lookup (mtp+lookup), else none
  c.drafter = 'auto'          # auto | none (plain autoregressive) | ngram | draft_model | mtp | heads
                              # | mtp+lookup | heads+lookup (prompt lookup first, below)
  c.drafter_checkpoint = ''   # mtp / heads: a trained drafter's folder; '' = the shipped one
  c.draft_len = 4             # k: tokens drafted per round (dynamic: the most it may draft)
  # Dynamic draft length (specdec_jax/policy.py): each round drafts 0 (a plain
  # step) or one of policy_ks tokens, from measured costs and each row's
  # recent acceptance; a row offers its drafts while the drafter's confidence
  # stays >= confidence_threshold. dynamic=false: always draft_len (ablations).
  c.dynamic = True
  c.policy_ks = ''            # e.g. '1,2,4'; '' = 1, 2, 4, ... up to draft_len (0 is always allowed)
  c.costs = ''                # round cost per length (0 first) in plain steps; '' = measure once (cached)
  c.confidence_threshold = 0.4
  c.acceptance_prior = 0.6    # acceptance rate assumed before a row has evidence
  c.acceptance_decay = 0.7    # per-round discount of each row's acceptance counts
  # Tree drafting (specdec_jax/tree.py): each round verifies a tree of drafts
  # in one target pass. '' = a chain (draft_len drafts); auto = the shape
  # measured best for the drafter (tree.AUTO); or the branching per depth,
  # e.g. '4,2,1' (or 4x2x1): 4 first tokens, 2 continuations of each, 1 of
  # each of those = 1 + 4 + 8 + 8 = 21 verify rows ('4x2x1-s': at T > 0 the
  # siblings are drawn from the drafter's q, not its top-b); or a dynamic tree
  # (EAGLE-2), 'dyn8' or 'dyn8-d4-k4': per row and round the 8 best-scoring
  # nodes of the drafter's expansions, 9 verify rows (mtp, heads). The tree's
  # depth is the draft length (draft_len is not used) and its rounds are
  # never dynamic (dynamic is ignored). ngram (a trie of its matches), heads
  # and mtp drafters; docs/TREE.md.
  c.tree = ''
  # Trace of rounds: each output line gets `rounds`, one {"drafts": [ids],
  # "accepted": n} per verify round (a tree: the accepted path's drafts);
  # rounds where the drafter abstained are omitted.
  c.trace = False
  c.max_ngram = 3             # ngram: longest suffix matched
  c.min_ngram = 1             # ngram: shorter matches abstain (the round is an AR step)
  # mtp+lookup / heads+lookup: prompt lookup first. A row whose last `lookup`
  # tokens (up to max(lookup, max_ngram)) occurred earlier drafts what
  # followed them, the other rows the trained drafter's tokens (drafters.LookupDrafter).
  c.lookup = 2
  # ... and a row with only a shorter match (1 .. lookup - 1 tokens) drafts
  # from it where the trained drafter's first-token confidence (the peak of
  # its q) is below this; 0 = off (docs/BENCHMARKS.md section 10).
  c.lookup_unsure = 0.7
  # ... and, sampling (temperature > 0), a row drafts by lookup only where the
  # trained drafter gives lookup's first token at least this probability
  # (a one-hot lookup draft is accepted with the target's probability of its
  # token); 0 = as greedy, 1 (the default) = where the drafter is certain
  # of it, i.e. the trained drafter's draft (docs/BENCHMARKS.md section 11).
  c.lookup_sampled_min = 1.0
  c.draft_model = 'tiny'      # draft_model: 'tiny' (random 2-layer Gemma) | 'target' (itself)
  c.draft_vocab_size = 0      # draft_model=tiny: 0 = the target's (must match)
  c.parallel = 'auto'         # auto | none | pmap | mesh
  c.num_devices = 0           # 0 = all local devices
  # An existing output is refused unless one of these is set (README: Long runs).
  c.resume = False            # keep its complete lines, generate the missing (index, sample) pairs
  c.overwrite = False         # replace it
  # Several processes / hosts ('' / 0 / -1 = JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  # JAX_PROCESS_ID; none set = one process). Process 0 writes.
  c.coordinator_address = ''  # host:port of process 0
  c.num_processes = 0
  c.process_id = -1
  c.coordinator_timeout = 300 # seconds to wait for every process
  return c
