"""Self-distilled drafter training data from Gemma 3 270M (issue #14 items 1-2).

    sh tools/fetch_corpora.sh python3.11-doc git-doc      # once: prose sources
    mkdir -p outputs/distill/gemma3_270m
    nohup nice -n 19 python -m experiments.run --config=configs/distill_data.py \
        >> outputs/distill/gemma3_270m/run.log 2>&1 &
    echo $! > /tmp/distill_data.pid
    python -m experiments.run --config=configs/distill_data.py:tiny   # tiny random target, seconds

Literary prose mixed in (`:literary`; first `sh tools/fetch_corpora.sh
sword-text-web dict-devil && pip install pysword && python tools/plain_text_corpora.py`):
    nohup nice -n 19 python -m experiments.run --config=configs/distill_data.py:literary \
        >> outputs/distill/gemma3_270m_literary/run.log 2>&1 &
Measured 2026-11-28 (AMD EPYC Zen 3, 2 cores, no AVX512_BF16: float32
weights; seed 2): 42-59 tok/s per batch of 16 when alone, 5-13 beside the
test suite; 119,476 tokens (640 prompts, 10 shards of 56 MB) in 1 h 50 min
of a shared session. The shipped drafter was trained further on them
(docs/BENCHMARKS.md section 10). Since session 15 `auto` picks bf16 weights
on that CPU (section 12), so that float32 folder resumes with
`--config.param_dtype=float32` (it holds 17 shards, 200,668 tokens, 1,088
prompts); session 15 started a bf16 one beside it with another seed
(`--config.seed=3 --config.param_dtype=bfloat16
--config.folder=outputs/distill/gemma3_270m_literary_bf16`; training takes
both: `--config.shards=A,B`).

The same command resumes (after a kill, a reboot, or on another machine with
the folder copied); `--config.max_prompts` may be raised to continue further.

The target continues prompts cut from Python stdlib sources, the Python docs'
reST, git's documentation and written chat openings (distill_data.CHAT_OPENINGS),
greedy or sampled at T = 1 (`greedy_fraction`), batched, with bf16 weights
where `param_dtype=auto` picks them (a folder keeps the weight dtype it was
started with: `--config.param_dtype=` the manifest's to resume one written
before auto changed on a CPU, as below). Its hidden states, top-16
log-probs and the KV of the layers the drafter reads are recorded while it
generates, into append-only shards under `folder` (manifest.json lists them
with sha256). Rerunning the same command resumes after the last complete
shard, also on another machine from the folder alone; a folder written for
another target, layout or data settings is refused. Progress (tokens so far,
tok/s, ETA) goes to stderr and folder/log.jsonl.

Evaluation prompts (HumanEval, fortunes, the Jargon File, experiments/prompts)
are never sources (a test asserts it).

Measured 2026-11-27 (AMD EPYC, 2 cores shared by 4 agents, AVX512_BF16, bf16
weights, prompts 16-63 + 192 new tokens, nice 19): at batch 8, 35-97 tok/s
per batch, median 62 (97 when nothing else runs), one 64-row shard (~12k
tokens, 56 MB: hidden + KV of 2 layers, float16) every ~3 min. The batch size
alone, timed in one process (`record`, 48 new tokens, cpulock, this job
running niced beside it): batch 8 90-94, 16 116-128, 32 110-129 tok/s, so
batch 16 is the default (the prompt stream does not depend on it; a resumed
run may change it). 20,000 prompts ~ 3.8M tokens, ~17 GB. Training from the
shards (configs/train_mtp.py --config.shards=<folder>): 2.5 s per step of
8 x 256 tokens while this job runs.

On an NVIDIA H200 (2026-11-27, tools/accelerator_drafters.py, batch 512,
`max_seconds=150`): 1.04M tokens in 155 s, 86 s of it to the first batch
(GGUF conversion + compilation), then 19.8k tok/s per batch and 14.0k
with the shard writes (450 MB per 512 rows); training on them 0.036 s per
step of 64 x 256 tokens (docs/BENCHMARKS.md section 6).
"""
import ml_collections

STDLIB_CODE = '{stdlib}/**/*.py'
PYDOC_PROSE = '{corpora}/python3.11-doc/usr/share/doc/python3.11/html/_sources/**/*.rst.txt'
GIT_DOCS = '{corpora}/git-doc/usr/share/doc/git-doc/*.txt'
# Literary prose (tools/plain_text_corpora.py): the World English Bible and
# Bierce's Devil's Dictionary; the `:literary` variant mixes them in.
WEB_BIBLE = '{corpora}/plain/web-bible/*.txt'
DEVIL = '{corpora}/plain/devil/devil.txt'


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = 'distill_data'
  c.model = 'gemma3_270m'       # the target; 'tiny' = random tiny model, byte tokenizer
  c.gguf = ''
  c.param_dtype = 'auto'        # bf16 weights on a CPU with AVX512_BF16
  c.dtype = 'float32'
  c.target_seed = 0             # model=tiny: its random weights
  # 'weight:pattern' ({stdlib}, {corpora} as in training); 'chat' = the written openings.
  c.data = (f'0.4:{STDLIB_CODE}', f'0.25:{PYDOC_PROSE}', f'0.1:{GIT_DOCS}', '0.25:chat')
  c.seed = 0                    # prompt i and its sampling key are functions of (seed, i)
  c.greedy_fraction = 0.5       # the rest sampled at `temperature`
  c.temperature = 1.0
  c.min_prompt_tokens = 16      # prompt length (after BOS) drawn uniformly in [min, max]
  c.max_prompt_tokens = 63      # BOS + 63 = a 64-token bucket
  c.max_new_tokens = 192        # cache = 64 + 192 = 256 slots
  c.topk = 16                   # top-k log-probs per position (the KL loss); 0 = none
  c.batch_size = 16             # 1.3x the tokens/s of 8 here (8: 90-94, 16: 116-128, 32: 110-129)
  c.shard_rows = 64             # rows per shard (a multiple of batch_size)
  c.max_prompts = 20_000        # stop after this many prompts (~3.8M generated tokens, ~17 GB)
  c.stop_after_shards = 0       # > 0: stop after writing this many shards (tests)
  c.max_seconds = 0.0           # > 0: stop after the shard that ends past this many seconds
  c.folder = 'outputs/distill/gemma3_270m'
  if arg == 'tiny':
    c.model = 'tiny'
    c.data = ('1:{stdlib}/json/*.py', '1:chat')
    c.min_prompt_tokens, c.max_prompt_tokens, c.max_new_tokens = 8, 31, 32
    c.shard_rows, c.max_prompts = 16, 64
    c.folder = 'outputs/distill/tiny'
  elif arg == 'literary':
    # The prose lever: the evaluation prose is literary (fortunes' literature
    # quotes), the default sources are technical. Same weights for code and chat.
    c.data = (f'0.4:{STDLIB_CODE}', f'0.1:{PYDOC_PROSE}', f'0.1:{WEB_BIBLE}', f'0.15:{DEVIL}',
              '0.25:chat')
    c.folder = 'outputs/distill/gemma3_270m_literary'
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (use :tiny, :literary or nothing)')
  return c
