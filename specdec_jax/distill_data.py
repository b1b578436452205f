"""Self-distilled drafter training data: the target's own continuations, with
the drafter's features recorded while it generates, in resumable shards.

    python -m experiments.run --config=configs/distill_data.py

Prompts: prompt i is a pure function of (seed, i, the data files): a weighted
choice of source (file globs as in train.expand_data, or the written `chat`
openings below), a file, a line to start at and a length. A row is greedy or
sampled (temperature `temperature`) by the same draw. Rows run batched through
the target (Generator.prefill, then our own jitted AR loop over
`Generator.call_target`), which writes each step's final-normed hidden state
into a [B, S, D] buffer and the top-k log-probs of the logits it already has,
and draws tokens with `draw` (exact inverse-CDF sampling, ~40x cheaper here
than the Gumbel draw of Generator.next_tokens); the KV of the layers the
drafter reads is the final cache (slot == position).

Row layout (position t, S = cache size, P = prompt length, L = tokens held):
  tokens[t]      the prompt, then the target's tokens; 0 past L
  hidden[t]      the final-normed state at t (it predicted token t+1), for
                 t in [P-2, L-2]; zeros elsewhere (P-2 comes from prefill)
  labels[t]      tokens[t+1] where the target chose it (t in [P-1, L-2]), else -1
  top_ids/logp   the target's top-k at t (its raw T=1 distribution), t in [P-1, L-2]
  kv             [n, 2, K, S, H]: K and V of train.feature_kv_layers, slots [0, L-2]
This is what the drafter sees at inference: after prefill it reads hidden[P-2]
and the pending token P-1, then the target's own outputs.

Shards: `shard-000000.npz`, ... (uncompressed npz, written to a temporary
name and renamed), and `manifest.json` (also replaced atomically) with the
target's identity, the layout version, the settings that fix the prompt
stream, and per shard its first prompt, rows, bytes and sha256. The manifest
is the truth: a shard file it does not list (a kill between the two renames)
is regenerated. A rerun continues at `next_prompt`, from the folder alone.
"""
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import pathlib
import sys
import sysconfig
import time
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax.config import is_eos
from specdec_jax.errors import UserError

LAYOUT_VERSION = 1
FORMAT = 'specdec_jax self-distilled drafter data'
# Sources of the benchmarks' evaluation prompts (experiments/prompts/,
# tools/make_prompt_sets.py): a training file whose path names one is refused.
EVAL_SOURCES = ('fortune', 'jargon', 'humaneval', 'human_eval', 'human-eval',
                'experiments/prompts')

# ----------------------------------------------------------------------------
# Written chat-style openings (not from any evaluation set: the chat benchmark's
# questions are tools/make_prompt_sets.CHAT_QUESTIONS, and a test keeps them apart).
# ----------------------------------------------------------------------------

CHAT_PREAMBLES = (
    'The following is a chat between a user and an AI assistant that answers clearly.\n\n',
    'Transcript of a support conversation.\n\n',
    'Below, an assistant helps someone with a question.\n\n',
    'A knowledgeable assistant replies to messages.\n\n',
    'Chat log\n\n',
    '',
)
CHAT_TURNS = (('User: ', '\nAssistant:'), ('Q: ', '\nA:'), ('Human: ', '\nAI:'),
              ('Me: ', '\nBot:'))
# An optional first exchange and a few words before the question: with the
# formats above, ~32k distinct openings, so greedy rows (a function of the
# prompt alone) rarely repeat.
CHAT_GREETINGS = (None, ('Hi there!', 'Hello! What can I help you with?'),
                  ('Good evening.', 'Good evening! How can I help?'),
                  ('Hey, can I ask you something?', 'Of course, go ahead.'))
CHAT_CONTEXTS = ('', "I'm new to this. ", 'Quick question: ', 'Please keep it short. ',
                 'For a school project: ', "I've wondered about this for a while. ")
CHAT_OPENINGS = (
    'How do I read a CSV file in Python and skip the header row?',
    'What is a closure in JavaScript?',
    'Explain recursion to a ten-year-old.',
    'Why does my for loop print the same number every time?',
    'How do I undo the last git commit but keep my changes?',
    'What is the difference between a list and a tuple?',
    'Can you write a function that checks whether a string is a palindrome?',
    'How many minutes should I boil an egg for a soft yolk?',
    'What causes the seasons on Earth?',
    'Give me three tips for a job interview.',
    'What is the capital of Australia, and why is it not Sydney?',
    'How do vaccines train the immune system?',
    'Summarize the plot of Romeo and Juliet in a few lines.',
    'What is a good way to start learning the guitar?',
    'How does compound interest work?',
    'Translate "good morning, how are you?" into French and Spanish.',
    'What is the difference between RAM and storage?',
    'How do I center a div with CSS?',
    'Explain what an API is with an everyday example.',
    'Write a haiku about autumn rain.',
    'What should I do if my houseplant has yellow leaves?',
    'How does a refrigerator keep food cold?',
    'What is the Pythagorean theorem used for?',
    'How can I sleep better at night?',
    'What is a regular expression, and when should I avoid one?',
    'Why do cats purr?',
    'How do I sort a dictionary by its values in Python?',
    'What is the difference between SQL and NoSQL databases?',
    'Plan a simple vegetarian dinner for four people.',
    'How do airplanes stay in the air?',
    'What does HTTP status code 404 mean?',
    'Can you explain big-O notation briefly?',
    'How do I write a good commit message?',
    'What are the main causes of inflation?',
    'Give me a short workout I can do at home without equipment.',
    'What is photosynthesis?',
    'How do I handle exceptions in Python?',
    'Write a polite email asking a colleague for feedback on a draft.',
    'What is the difference between latitude and longitude?',
    'How do I make my bash script stop on the first error?',
    'Why is the ocean salty?',
    'What is machine learning, in plain words?',
    'How do I find the largest file in a directory on Linux?',
    'Recommend a strategy for learning vocabulary in a new language.',
    'What happens when I type a URL into my browser?',
    'Explain the rules of chess for the knight.',
    'How do I split a long function into smaller ones?',
    'What is the difference between a virus and a bacterium?',
    'Write a limerick about a forgetful robot.',
    'How can I save money on groceries?',
    'What is a linked list, and when is it useful?',
    'How do I measure the speed of my Python code?',
    'What are black holes made of?',
    'Describe a calm morning routine.',
    'How do I merge two sorted lists efficiently?',
    'What is the purpose of a unit test?',
)


def chat_prompt(pre: int, turn: int, greet: int, ctx: int, q: int) -> str:
  user, assistant = CHAT_TURNS[turn]
  g = CHAT_GREETINGS[greet]
  first = f'{user}{g[0]}{assistant} {g[1]}\n' if g else ''
  return f'{CHAT_PREAMBLES[pre]}{first}{user}{CHAT_CONTEXTS[ctx]}{CHAT_OPENINGS[q]}{assistant}'


# ----------------------------------------------------------------------------
# Prompts: a deterministic stream.
# ----------------------------------------------------------------------------

def parse_data(spec: Sequence[str]):
  """'weight:pattern' entries -> [(weight, pattern)]; 'chat' is the openings."""
  out = []
  for entry in spec:
    w, sep, pat = str(entry).partition(':')
    try:
      weight = float(w)
    except ValueError:
      weight = -1.0
    if not sep or not pat or not weight > 0:
      raise UserError(f"data entry {entry!r} is not 'weight:pattern' with weight > 0")
    out.append((weight, pat))
  if not out:
    raise UserError('data must list at least one weight:pattern entry')
  return out


def _subs() -> Dict[str, str]:
  from specdec_jax import train
  return dict(stdlib=sysconfig.get_paths()['stdlib'], corpora=str(train.corpora_dir()))


def resolve_files(spec) -> List[List[pathlib.Path]]:
  """One sorted file list per data entry ([] for 'chat'); each pattern must
  match files (as train.expand_data matches them), and none may be an
  evaluation source."""
  groups = []
  for _, pat in parse_data(spec):
    if pat == 'chat':
      groups.append([])
      continue
    files = sorted(p for p in map(pathlib.Path, glob.glob(pat.format(**_subs()), recursive=True))
                   if p.is_file() and not ('{stdlib}' in pat and   # not packages beside it
                                           {'site-packages', 'dist-packages'} & set(p.parts)))
    if not files:
      raise UserError(f'data pattern {pat!r} matches no files')
    for f in files:
      if any(s in str(f).lower() for s in EVAL_SOURCES):
        raise UserError(f'{f} is an evaluation source (fortunes, the Jargon File, HumanEval, '
                        'experiments/prompts): keep it out of training data')
    groups.append(files)
  return groups


def _root(pattern: str) -> pathlib.Path:
  """The fixed folder a glob pattern starts from ({stdlib} etc. substituted)."""
  parts = pathlib.Path(pattern.format(**_subs())).parts
  fixed = [p for p in itertools.takewhile(lambda p: not set('*?[') & set(p), parts)]
  return pathlib.Path(*fixed)


def relative_names(spec, groups) -> List[List[str]]:
  """Each file's name relative to its pattern's root: the same data on another
  machine (another Python's stdlib folder) has the same names."""
  out = []
  for (_, pat), files in zip(parse_data(spec), groups):
    root = _root(pat) if files else None
    out.append([str(f.relative_to(root)) for f in files])
  return out


def data_digest(spec, groups) -> str:
  """Identity of the prompt stream's inputs: the patterns, relative names, sizes."""
  h = hashlib.sha256()
  for (_, pat), files, names in zip(parse_data(spec), groups, relative_names(spec, groups)):
    h.update(pat.encode())
    for f, n in zip(files, names):
      h.update(f'{n}:{f.stat().st_size}\n'.encode())
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=512)
def _read(path: pathlib.Path):
  try:
    text = path.read_text(encoding='utf-8')
  except (UnicodeDecodeError, OSError):
    return None, None
  starts = np.flatnonzero(np.frombuffer(('\n' + text).encode('utf-32-le'), np.uint32)
                          == ord('\n'))                       # line starts (char offsets)
  return text, starts


@dataclasses.dataclass(frozen=True)
class Prompt:
  index: int
  ids: tuple          # BOS + prompt tokens
  source: str         # file (relative) or chat/<n>: the held-out split key
  greedy: bool


class PromptStream:
  """prompt(i) is a pure function of (seed, i, files): resumable anywhere."""

  def __init__(self, spec, groups, tokenizer, *, seed: int, min_tokens: int, max_tokens: int,
               greedy_fraction: float):
    entries = parse_data(spec)
    w = np.asarray([e[0] for e in entries])
    self.p = w / w.sum()
    self.groups, self.tok = groups, tokenizer
    self.names = relative_names(spec, groups)
    self.seed, self.min, self.max, self.greedy_fraction = seed, min_tokens, max_tokens, greedy_fraction

  def prompt(self, i: int) -> Prompt:
    rng = np.random.default_rng([self.seed, i])
    greedy = bool(rng.random() < self.greedy_fraction)
    n = int(rng.integers(self.min, self.max + 1))
    for _ in range(100):                          # skip unreadable / near-empty picks
      g = int(rng.choice(len(self.p), p=self.p))
      files = self.groups[g]
      if not files:                               # chat
        q = int(rng.integers(len(CHAT_OPENINGS)))
        text = chat_prompt(*(int(rng.integers(len(x))) for x in (
            CHAT_PREAMBLES, CHAT_TURNS, CHAT_GREETINGS, CHAT_CONTEXTS)), q)
        ids = self.tok.encode(text)
        ids = ids[:1] + ids[1:][-(self.max):]    # keep the end: the question and the cue
        return Prompt(i, tuple(ids), f'chat/{q}', greedy)
      j = int(rng.integers(len(files)))
      text, starts = _read(files[j])
      if not text:
        continue
      off = int(starts[int(rng.integers(len(starts)))])
      ids = self.tok.encode(text[off:off + 8 * n])[:1 + n]
      if len(ids) >= 1 + self.min:
        return Prompt(i, tuple(ids), self.names[g][j], greedy)
    raise UserError(f'prompt {i}: no usable text after 100 draws; check the data files')


# ----------------------------------------------------------------------------
# Recording while generating.
# ----------------------------------------------------------------------------

def draw(logits, temperature, u):
  """One token per row: argmax where temperature <= 0, else an exact draw from
  softmax(logits / temperature) by inverse CDF over `u` [B] ~ U(0, 1)
  (sampling.inverse_cdf: 20-45x cheaper here than a Gumbel draw; a data job
  needs no token-for-token agreement across device layouts)."""
  from specdec_jax import sampling
  t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
  z = logits.astype(jnp.float32) / t
  p = jnp.exp(z - jnp.max(z, -1, keepdims=True))
  return jnp.where(temperature > 0, sampling.inverse_cdf(p, u),
                   sampling.argmax(logits)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('gen', 'kv_layers', 'topk'), donate_argnames=('state',))
def record(gen, params, state, kv_layers: tuple, topk: int):
  """AR-decodes `state` (from gen.prefill) until every row is done, keeping
  what the drafter trains on. Returns (state, hidden [B, S, D] float16,
  top_ids [B, S, topk] int32, top_logp [B, S, topk] float16, kv [B, n, 2, K, S, H] float16)."""
  B, S = state.tokens.shape
  rows = jnp.arange(B)
  D = gen.config.embed_dim
  plen = state.batch.prompt_lengths
  # Prefill's state at P-2 predicted the pending token (a 1-token prompt: zeros).
  hid = jnp.zeros((B, S, D), jnp.float32).at[rows, jnp.maximum(plen - 2, 0)].set(state.hidden)
  top_i = jnp.zeros((B, S, topk), jnp.int32)
  top_l = jnp.zeros((B, S, topk), jnp.float32)

  def body(carry):
    st, hid, top_i, top_l = carry
    L, live = st.lengths, ~st.done
    pending = st.tokens[rows, L - 1]                                      # [B]
    logits, h, cache = gen.call_target(params, pending[:, None], st.cache)
    logits = logits[:, 0]                                                 # [B, V]
    # The draw's key depends on (row stream, position) only, as in Generator.
    u = jax.vmap(lambda k, pos: jax.random.uniform(jax.random.fold_in(k, pos)))(st.batch.keys, L)
    nxt = draw(logits, st.batch.temperature, u)
    at = jnp.where(live, L - 1, S)        # out of bounds: dropped (a finished row writes nothing)
    hid = hid.at[rows, at].set(h[:, 0].astype(jnp.float32), mode='drop')
    if topk:
      v, i = jax.lax.top_k(logits, topk)                                  # [B, topk]
      top_i = top_i.at[rows, at].set(i, mode='drop')
      top_l = top_l.at[rows, at].set(v - jax.nn.logsumexp(logits, -1, keepdims=True), mode='drop')
    tokens = st.tokens.at[rows, jnp.where(live, L, S)].set(nxt, mode='drop')
    lengths = L + live
    done = st.done | (live & is_eos(nxt, gen.config)) | (lengths >= st.batch.limits)
    st = st.replace(tokens=tokens, lengths=lengths, done=done, hidden=h[:, 0],
                    cache=cache.replace(lengths=lengths - 1))
    return st, hid, top_i, top_l

  state, hid, top_i, top_l = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done), body,
                                                (state, hid, top_i, top_l))
  kv = jnp.stack([jnp.stack([state.cache.k[l], state.cache.v[l]], 1) for l in kv_layers], 1)
  return (state, hid.astype(jnp.float16), top_i, top_l.astype(jnp.float16),
          kv.astype(jnp.float16))


def generate_rows(gen, params, prompts: Sequence[Prompt], *, batch_size: int, bucket_len: int,
                  max_new_tokens: int, temperature: float, seed: int, kv_layers: tuple,
                  topk: int) -> Dict[str, np.ndarray]:
  """One batch (<= batch_size prompts) -> its rows, as host arrays."""
  from specdec_jax.generate import make_batch
  n = len(prompts)
  keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), p.index) for p in prompts])
  batch = make_batch([list(p.ids) for p in prompts], batch_size=batch_size, bucket_len=bucket_len,
                     max_new_tokens=max_new_tokens, keys=keys)
  temp = np.asarray([0.0 if p.greedy else temperature for p in prompts] + [0.0] * (batch_size - n),
                    np.float32)
  batch = batch.replace(temperature=jnp.asarray(temp))
  state = gen.prefill(params, batch)
  state, hid, top_i, top_l, kv = jax.device_get(record(gen, params, state, kv_layers, topk))
  tokens, lengths = np.asarray(state.tokens)[:n], np.asarray(state.lengths)[:n]
  plen = np.asarray([len(p.ids) for p in prompts], np.int32)
  S = tokens.shape[1]
  t = np.arange(S)[None]
  chosen = (t >= plen[:, None] - 1) & (t <= lengths[:, None] - 2)     # label = a target token
  labels = np.where(chosen, np.roll(tokens, -1, axis=1), -1).astype(np.int32)
  return dict(tokens=tokens.astype(np.int32), lengths=lengths.astype(np.int32),
              prompt_lengths=plen, prompt_index=np.asarray([p.index for p in prompts], np.int64),
              greedy=np.asarray([p.greedy for p in prompts]),
              source=np.asarray([p.source for p in prompts]),
              hidden=hid[:n], labels=labels, top_ids=top_i[:n], top_logp=top_l[:n], kv=kv[:n])


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------

def validate(c) -> None:
  from specdec_jax import outputs, precision
  from specdec_jax.targets import check_model_name
  check_model_name(c.model)
  for key in ('batch_size', 'shard_rows', 'max_new_tokens', 'min_prompt_tokens',
              'max_prompt_tokens', 'max_prompts'):
    if c[key] < 1:
      raise UserError(f'{key} must be >= 1, got {c[key]}')
  if c.min_prompt_tokens > c.max_prompt_tokens:
    raise UserError(f'min_prompt_tokens={c.min_prompt_tokens} > max_prompt_tokens={c.max_prompt_tokens}')
  if c.shard_rows % c.batch_size:
    raise UserError(f'shard_rows={c.shard_rows} is not a multiple of batch_size={c.batch_size}')
  if not 0 <= c.greedy_fraction <= 1:
    raise UserError(f'greedy_fraction must be in [0, 1], got {c.greedy_fraction}')
  if not c.temperature > 0:
    raise UserError(f'temperature (of the sampled rows) must be > 0, got {c.temperature}')
  if c.topk < 0 or c.stop_after_shards < 0:
    raise UserError('topk and stop_after_shards must be >= 0')
  if not c.get('max_seconds', 0) >= 0:
    raise UserError(f'max_seconds must be >= 0 (0: no limit), got {c.max_seconds}')
  if not c.folder:
    raise UserError('folder must name the shard folder')
  parse_data(c.data)
  outputs.check_writable_dir(pathlib.Path(c.folder), f'folder {c.folder}')
  precision.resolve(c.param_dtype, c.dtype)


# The ModelConfig fields that fix what the target computes, hashed into a shard
# folder's identity. Named, not "every field": a field added to ModelConfig
# later (eos_ids was) must not orphan every folder written before it. Stop ids
# enter the hash only where they are not the default (eos_id alone), for the
# same reason. dtype / param_dtype are recorded beside the hash.
IDENTITY_FIELDS = ('vocab_size', 'num_layers', 'embed_dim', 'hidden_dim', 'num_heads',
                   'num_kv_heads', 'head_dim', 'query_pre_attn_scalar', 'sliding_window',
                   'sliding_window_pattern', 'rope_base_global', 'rope_base_local',
                   'rope_scale_global', 'norm_eps', 'max_context', 'dtype', 'param_dtype',
                   'bos_id', 'eos_id', 'pad_id')
# Fields left out of the hash (a test holds the two lists to ModelConfig's fields,
# so a new field must be put in one of them).
NOT_IDENTITY_FIELDS = ('eos_ids',)     # enters as stop_ids where not the default


def _config_hash(c, target, fields: Dict) -> str:
  from specdec_jax import target_training
  extra = ''
  if c.model == 'tiny':
    extra = f'seed={c.target_seed}'
  elif target_training.is_target_dir(c.model):
    extra = json.loads((pathlib.Path(c.model) / 'target.json').read_text())['sha256']
  return hashlib.sha256((json.dumps(fields, sort_keys=True) + extra).encode()).hexdigest()[:16]


def target_identity(c, target) -> Dict:
  cfg = dataclasses.asdict(target.config)
  fields = {k: cfg[k] for k in IDENTITY_FIELDS}
  if tuple(target.config.stop_ids) != (target.config.eos_id,):
    fields['stop_ids'] = list(target.config.stop_ids)
  return dict(name=c.model, gguf=c.gguf, config_sha256=_config_hash(c, target, fields),
              param_dtype=target.config.param_dtype, dtype=target.config.dtype)


def legacy_config_hash(c, target) -> str:
  """The hash sessions of Nov 26-27 wrote: over every ModelConfig field then
  (IDENTITY_FIELDS + eos_ids). Folders carrying it are the same target and are
  updated to the hash above when they resume."""
  cfg = dataclasses.asdict(target.config)
  return _config_hash(c, target, {k: cfg[k] for k in IDENTITY_FIELDS + ('eos_ids',)})


class Log:
  def __init__(self, folder: pathlib.Path):
    self.path = folder / 'log.jsonl'

  def __call__(self, msg: str, **record):
    print(msg, file=sys.stderr, flush=True)
    if record:
      with self.path.open('a') as f:
        f.write(json.dumps(dict(time=round(time.time(), 1), **record)) + '\n')


def run(c) -> dict:
  """The data job (config: configs/distill_data.py)."""
  from specdec_jax import shards, train
  from specdec_jax.generate import Generator, bucket
  from specdec_jax.targets import load_target

  validate(c)
  folder = pathlib.Path(c.folder)
  groups = resolve_files(c.data)
  manifest = shards.load_manifest(folder)
  log = Log(folder)
  t0 = time.time()
  target = load_target(c.model, gguf=c.gguf, param_dtype=c.param_dtype, dtype=c.dtype,
                       seed=c.target_seed)
  kv_layers = train.feature_kv_layers(target.config)
  bucket_len = bucket(c.max_prompt_tokens + 1)
  identity = dict(
      format=FORMAT, layout_version=LAYOUT_VERSION, target=target_identity(c, target),
      kv_layers=list(kv_layers), topk=c.topk, seed=c.seed, data=list(c.data),
      data_digest=data_digest(c.data, groups), greedy_fraction=c.greedy_fraction,
      temperature=c.temperature, min_prompt_tokens=c.min_prompt_tokens,
      max_prompt_tokens=c.max_prompt_tokens, max_new_tokens=c.max_new_tokens,
      cache_size=bucket_len + c.max_new_tokens)
  if manifest is None:
    manifest = dict(identity=identity, shards=[])
    shards.write_manifest(folder, manifest)
  else:
    # The layout first: a folder of another layout may differ in anything else.
    old = manifest['identity']
    if old.get('format') != FORMAT or old.get('layout_version') != LAYOUT_VERSION:
      raise UserError(f'shard folder {folder} holds feature layout {old.get("layout_version")!r} '
                      f'of {old.get("format")!r}; this code writes layout {LAYOUT_VERSION}')
    if old.get('data_digest') != identity['data_digest'] and old.get('data') == identity['data']:
      raise UserError(f'shard folder {folder} was written from other files under the same data '
                      'patterns (names or sizes differ: another Python or corpus version?); '
                      'the prompt stream would change: use another folder')
    if (old.get('target', {}).get('config_sha256') == legacy_config_hash(c, target)
        and {**old['target'], 'config_sha256': None} == {**identity['target'], 'config_sha256': None}):
      old['target'] = identity['target']
      shards.write_manifest(folder, manifest)
      log(f'{folder}: target hash updated to the named-fields form ({identity["target"]["config_sha256"]})')
    shards.check_identity(folder, manifest, identity)
    shards.check_sizes(folder, manifest)
  entries = manifest['shards']
  next_prompt = entries[-1]['first_prompt'] + entries[-1]['rows'] if entries else 0
  done_tokens = sum(e['new_tokens'] for e in entries)
  if next_prompt >= c.max_prompts:
    log(f'{folder}: {next_prompt} prompts already done (max_prompts={c.max_prompts})')
    return dict(folder=str(folder), shards=len(entries), prompts=next_prompt,
                new_tokens=done_tokens, stopped='max_prompts')
  log(f'{folder}: {len(entries)} shards, {next_prompt} prompts, {done_tokens} generated tokens '
      f'so far; target {c.model} ({target.precision}); kv layers {list(kv_layers)}')
  stream = PromptStream(c.data, groups, target.tokenizer, seed=c.seed,
                        min_tokens=c.min_prompt_tokens, max_tokens=c.max_prompt_tokens,
                        greedy_fraction=c.greedy_fraction)
  gen = Generator(target.config, cache_size=identity['cache_size'])   # its prefill and target call
  # tokens/s counts batches after the first of this run (it includes compilation).
  run_tokens, t_run, written, total = 0, None, 0, done_tokens
  stopped = 'max_prompts'
  while next_prompt < c.max_prompts:
    n_rows = min(c.shard_rows, c.max_prompts - next_prompt)
    parts = []
    for s in range(next_prompt, next_prompt + n_rows, c.batch_size):
      prompts = [stream.prompt(i) for i in range(s, min(s + c.batch_size, next_prompt + n_rows))]
      t_batch = time.time()
      rows = generate_rows(gen, target.params, prompts, batch_size=c.batch_size,
                           bucket_len=bucket_len, max_new_tokens=c.max_new_tokens,
                           temperature=c.temperature, seed=c.seed, kv_layers=kv_layers,
                           topk=c.topk)
      parts.append(rows)
      new = int((rows['lengths'] - rows['prompt_lengths']).sum())
      total += new
      end = s + len(prompts)
      if t_run is None:
        t_run = time.time()
        log(f'  first batch: {new} tokens, {t_run - t0:.0f} s since start (load + compile)')
        continue
      run_tokens += new
      now = time.time()
      rate = run_tokens / max(now - t_run, 1e-9)                  # wall time: pauses count
      left = (c.max_prompts - end) * total / end                  # tokens, at the mean so far
      log(f'  prompts {end}/{c.max_prompts}, {total} tokens, {rate:.1f} tok/s '
          f'(this batch {new / max(now - t_batch, 1e-9):.1f}), ETA {left / max(rate, 1e-9) / 3600:.1f} h',
          kind='progress', prompts=end, tokens=total, tok_s=round(rate, 2),
          batch_tok_s=round(new / max(now - t_batch, 1e-9), 2))
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    new_tokens = int((arrays['lengths'] - arrays['prompt_lengths']).sum())
    e = shards.append(folder, manifest, arrays, first_prompt=next_prompt, new_tokens=new_tokens,
                      greedy_rows=int(arrays['greedy'].sum()))
    next_prompt += e['rows']
    done_tokens += new_tokens
    written += 1
    log(f'wrote {folder / e["file"]}: {e["rows"]} rows, {new_tokens} tokens '
        f'({e["bytes"] / 1e6:.1f} MB)', kind='shard', shard=e['file'], prompts=next_prompt,
        tokens=done_tokens)
    if c.stop_after_shards and written >= c.stop_after_shards:
      stopped = 'stop_after_shards'
      break
    if c.get('max_seconds', 0) and time.time() - t0 >= c.max_seconds:
      log(f'stopping after {time.time() - t0:.0f} s (max_seconds={c.max_seconds}); '
          'rerun the same command to continue')
      stopped = 'max_seconds'
      break
  secs = time.time() - (t_run or time.time())
  return dict(folder=str(folder), shards=len(manifest['shards']), prompts=next_prompt,
              new_tokens=done_tokens, tokens_this_run=run_tokens, stopped=stopped,
              tok_s=round(run_tokens / max(secs, 1e-9), 2), seconds=round(time.time() - t0, 1))
