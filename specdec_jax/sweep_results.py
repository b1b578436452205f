"""The sweep's results, from raw.jsonl alone: one row per point (`aggregate`),
results.csv, results.md and the plots. experiments/bench_hf.py writes its
peers' tables with the same functions (the `system` column tells them apart).
"""
import collections
import csv

import numpy as np

from specdec_jax import quality
from specdec_jax.measure import fit_alpha, predicted_speedup


def batch_seconds(rows):
  return sum({r['batch']: r['batch_seconds'] for r in rows}.values())


def fraction(flags):
  return round(sum(flags) / len(flags), 4) if flags else None


# ----------------------------------------------------------------------------- results

# `system` tells peers (experiments/bench_hf.py) from specdec_jax in one table.
POINT_KEYS = ('system', 'domain', 'drafter', 'kind', 'draft_len', 'temperature', 'batch_size')


def aggregate(raw):
  """One dict per point, from raw.jsonl rows alone."""
  groups = collections.OrderedDict()
  for r in raw:
    groups.setdefault(tuple(r[k] for k in POINT_KEYS), []).append(r)
  base_of = lambda p: (p['system'], p['domain'], p['temperature'], p['batch_size'])
  ar = {base_of(dict(zip(POINT_KEYS, k))): g for k, g in groups.items() if k[2] == 'none'}
  table = []
  for key, rows in groups.items():
    point = dict(zip(POINT_KEYS, key))
    k = point['draft_len']
    tokens = sum(r['new_tokens'] for r in rows)
    calls = sum(r['target_calls'] for r in rows)
    # Calls that verified drafts (the rest: AR steps where the drafter abstained).
    draft_calls = sum(r.get('draft_calls', r['target_calls']) for r in rows)
    seconds = batch_seconds(rows)
    base = ar[base_of(point)]
    ar_tps = sum(r['new_tokens'] for r in base) / batch_seconds(base)
    tps = tokens / seconds
    # Peers (bench_hf.py) report neither per-position acceptance nor costs.
    per_position = k and all(r['accepted_by_position'] is not None for r in rows)
    accepted = np.sum([r['accepted_by_position'] for r in rows], axis=0) if per_position else None
    e = tokens / calls
    f = rows[0]
    c_cost = v_cost = predicted = None
    # alpha from the tokens per verify call (each AR step gave one token).
    alpha = fit_alpha((tokens - calls + draft_calls) / max(draft_calls, 1), k) if k else None
    if k and f['draft_ms_per_round'] is not None:
      c_cost = f['draft_ms_per_round'] / (k * f['ar_ms_per_step'])
      v_cost = f['verify_ms_per_round'] / f['ar_ms_per_step']
      predicted = predicted_speedup(alpha, k, c_cost, v_cost, draft_calls / calls)
    pits = [x for r in rows if r['pit'] for x in r['pit']]
    identical = [r['identical_to_ar'] for r in rows if r['identical_to_ar'] is not None]
    table.append(dict(
        point, prompts=len(rows), new_tokens=tokens, target_calls=calls,
        seconds=round(seconds, 4), tokens_per_second=round(tps, 3),
        ms_per_token=round(1e3 / tps, 2), speedup=round(tps / ar_tps, 3),
        mean_accepted_per_call=round(e, 3),
        draft_calls=draft_calls,
        acceptance_rate=None if accepted is None else round(
            float(accepted.sum()) / (k * max(draft_calls, 1)), 4),
        acceptance_by_position=[] if accepted is None else [
            round(float(a) / max(draft_calls, 1), 4) for a in accepted],
        alpha=None if alpha is None else round(alpha, 4),
        c=None if c_cost is None else round(c_cost, 4),
        v=None if v_cost is None else round(v_cost, 4),
        predicted_speedup=None if predicted is None else round(predicted, 3),
        greedy_identical=fraction(identical),
        pit_p_value=None if not pits else _round(quality.pit_p_value(pits), 4),
        logprob_per_token=round(sum(r['logprob_sum'] for r in rows) / tokens, 4),
        ar_logprob_per_token=round(sum(r['logprob_sum'] for r in base)
                                   / sum(r['new_tokens'] for r in base), 4),
        drafter_params=f['drafter_params'], compile_seconds=round(f['compile_seconds'], 2),
        # Rows of each verify pass: k + 1 for a chain, the node count for a tree.
        verify_rows=f.get('verify_rows', k + 1 if k else 1), tree=f.get('tree')))
  return table


def _round(x, n):
  return None if x is None else round(x, n)


CSV_COLUMNS = POINT_KEYS + (
    'prompts', 'new_tokens', 'target_calls', 'draft_calls', 'seconds', 'tokens_per_second', 'ms_per_token',
    'speedup', 'mean_accepted_per_call', 'acceptance_rate', 'acceptance_by_position', 'alpha',
    'c', 'v', 'predicted_speedup', 'greedy_identical', 'pit_p_value', 'logprob_per_token',
    'ar_logprob_per_token', 'drafter_params', 'compile_seconds', 'verify_rows', 'tree')


def write_csv(table, path):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(CSV_COLUMNS)
    for t in table:
      w.writerow(['/'.join(map(str, t[c])) if isinstance(t[c], list) else
                  ('' if t[c] is None else t[c]) for c in CSV_COLUMNS])


def _fmt(x, suffix=''):
  return '–' if x is None else f'{x}{suffix}'


def _k_cell(t):
  """k, and the verify rows where they are not k + 1 (a tree)."""
  k, rows = t['draft_len'], t.get('verify_rows')
  if not k:
    return '–'
  return f'{k} ({rows} rows)' if rows and rows != k + 1 else str(k)


def markdown(table, c=None):
  systems = len({t['system'] for t in table}) > 1 or table[0]['system'] != 'specdec_jax'
  head = ('| domain | drafter | k | T | batch | ms/token | tok/s | speedup | tokens/call | '
          'acceptance | by position | predicted | quality | log-lik (AR) |')
  lines = [('| system ' if systems else '') + head, '|' + '---|' * (14 + systems)]
  for t in table:
    if t['temperature'] == 0:
      qual = f'identical {_fmt(t["greedy_identical"])}'
    else:
      qual = f'PIT p={_fmt(t["pit_p_value"])}'
    lines.append(
        (f'| {t["system"]} ' if systems else '') +
        f'| {t["domain"]} | {t["drafter"]} | {_k_cell(t)} | {t["temperature"]} | '
        f'{t["batch_size"]} | {t["ms_per_token"]} | {t["tokens_per_second"]} | '
        f'{t["speedup"]}x | {t["mean_accepted_per_call"]} | {_fmt(t["acceptance_rate"])} | '
        f'{" / ".join(map(str, t["acceptance_by_position"])) or "–"} | '
        f'{_fmt(t["predicted_speedup"], "x")} | {qual} | '
        f'{t["logprob_per_token"]} ({t["ar_logprob_per_token"]}) |')
  notes = ['', 'speedup: tok/s over plain AR on the same prompts in the same run; '
           'predicted: Leviathan et al. from α (fitted to tokens/call), c = draft cost per '
           'token / AR step, v = verify pass / AR step; quality: greedy completions identical '
           'to AR (fraction), or the PIT uniformity p-value of sampled tokens (quality.py); '
           'log-lik: the target\'s mean log-prob per generated token, AR\'s in brackets.']
  if c is not None:
    notes.append(f'model {c.model}, {c.prompts_per_domain} prompts x {c.max_new_tokens} new '
                 f'tokens per domain, repeats {c.repeats}.')
  return '\n'.join(lines + notes)


def write_plots(table, out):
  """PNG plots of the table; returns their paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  domains = list(dict.fromkeys(t['domain'] for t in table))
  drafters = list(dict.fromkeys(t['drafter'] for t in table if t['drafter'] != 'none'))
  temps = sorted({t['temperature'] for t in table})
  sizes = sorted({t['batch_size'] for t in table})
  ks = sorted({t['draft_len'] for t in table if t['draft_len']})
  T0, B0 = temps[0], sizes[0]
  k_ref = 4 if 4 in ks else (ks[len(ks) // 2] if ks else 0)
  pick = lambda **kw: [t for t in table if all(t[a] == b for a, b in kw.items())]
  paths = []

  def figure(name, title, draw, xlabel, ylabel, logx=False):
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.4), squeeze=False)
    for ax, d in zip(axes[0], domains):
      draw(ax, d)
      ax.set_title(d)
      ax.set_xlabel(xlabel)
      ax.grid(alpha=0.3)
      if logx:                # parameter counts: 0 (ngram) up to 10^8
        ax.set_xscale('symlog', linthresh=1e4)
        ax.set_xlim(-3e3, 3 * max(t['drafter_params'] for t in table))
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  def speedup_vs_k(ax, d):
    for i, dr in enumerate(drafters):
      rows = sorted(pick(domain=d, drafter=dr, temperature=T0, batch_size=B0),
                    key=lambda t: t['draft_len'])
      ax.plot([t['draft_len'] for t in rows], [t['speedup'] for t in rows], 'o-',
              color=f'C{i}', label=dr)
      pred = [(t['draft_len'], t['predicted_speedup']) for t in rows if t['predicted_speedup']]
      if pred:
        ax.plot(*zip(*pred), ':', color=f'C{i}', alpha=0.7)
    ax.axhline(1.0, color='k', lw=0.8)
  if ks:
    figure('speedup_vs_draft_len.png', f'speedup over AR (solid measured, dotted predicted), '
           f'T={T0}, batch {B0}', speedup_vs_k, 'draft length k', 'speedup')

  def acceptance(ax, d):
    for i, dr in enumerate(drafters):
      rows = pick(domain=d, drafter=dr, temperature=T0, batch_size=B0, draft_len=max(ks))
      if rows:
        a = rows[0]['acceptance_by_position']
        ax.plot(range(1, len(a) + 1), a, 'o-', color=f'C{i}', label=dr)
    ax.set_ylim(0, 1.02)
  if ks:
    figure('acceptance_by_position.png', f'P(draft i accepted), k={max(ks)}, T={T0}',
           acceptance, 'draft position i', 'acceptance')

  trees = [t for t in table if t.get('tree')]
  if trees:
    entries = list(dict.fromkeys(t['drafter'].split(' tree ')[0] for t in trees))

    def vs_rows(metric):
      def draw(ax, d):
        for i, entry in enumerate(entries):
          chain = sorted(pick(domain=d, drafter=entry, temperature=T0, batch_size=B0),
                         key=lambda t: t['verify_rows'])
          ax.plot([t['verify_rows'] for t in chain], [t[metric] for t in chain], 'o-',
                  color=f'C{i}', label=f'{entry} chain')
          tree = [t for t in trees if t['domain'] == d and t['temperature'] == T0
                  and t['batch_size'] == B0 and t['drafter'].split(' tree ')[0] == entry]
          ax.plot([t['verify_rows'] for t in tree], [t[metric] for t in tree], 's',
                  color=f'C{i}', mfc='none', ms=8, label=f'{entry} tree')
          for t in tree:
            ax.annotate(t['drafter'].split(' tree ')[1], (t['verify_rows'], t[metric]),
                        fontsize=6, xytext=(3, 3), textcoords='offset points')
        if metric == 'speedup':
          ax.axhline(1.0, color='k', lw=0.8)
      return draw
    figure('tree_vs_chain_speedup.png', f'speedup over AR vs verify rows: chains (k + 1 rows) '
           f'and trees (their nodes), T={T0}, batch {B0}', vs_rows('speedup'),
           'verify rows per target call', 'speedup')
    figure('tree_vs_chain_tokens_per_call.png', f'tokens per target call vs verify rows, '
           f'T={T0}, batch {B0}', vs_rows('mean_accepted_per_call'),
           'verify rows per target call', 'tokens per call')

  if len(temps) > 1:
    def vs_temperature(ax, d):
      for i, dr in enumerate(['none'] + drafters):
        rows = sorted(pick(domain=d, drafter=dr, batch_size=B0,
                           draft_len=0 if dr == 'none' else k_ref), key=lambda t: t['temperature'])
        ax.plot([t['temperature'] for t in rows], [t['tokens_per_second'] for t in rows], 'o-',
                color='k' if dr == 'none' else f'C{i - 1}', label='AR' if dr == 'none' else dr)
    figure('tokens_per_second_vs_temperature.png', f'tok/s vs temperature, k={k_ref}, batch {B0}',
           vs_temperature, 'temperature', 'tok/s')

  if len(sizes) > 1:
    def vs_batch(ax, d):
      for i, dr in enumerate(drafters):
        rows = sorted(pick(domain=d, drafter=dr, temperature=T0, draft_len=k_ref),
                      key=lambda t: t['batch_size'])
        ax.plot([t['batch_size'] for t in rows], [t['speedup'] for t in rows], 'o-',
                color=f'C{i}', label=dr)
      ax.axhline(1.0, color='k', lw=0.8)
      ax.set_xscale('log', base=2)
    figure('speedup_vs_batch_size.png', f'speedup vs batch size, k={k_ref}, T={T0}', vs_batch,
           'batch size', 'speedup')

  if len({t['drafter_params'] for t in table if t['drafter'] != 'none'}) > 1:
    def vs_size(ax, d):
      rows = pick(domain=d, temperature=T0, batch_size=B0, draft_len=k_ref)
      for i, dr in enumerate(drafters):
        for t in rows:
          if t['drafter'] == dr:
            ax.plot(t['drafter_params'], t['speedup'], 'o', color=f'C{i}', label=dr)
      ax.axhline(1.0, color='k', lw=0.8)
    figure('speedup_vs_drafter_params.png', f'speedup vs drafter parameters, k={k_ref}, T={T0}',
           vs_size, 'drafter parameters', 'speedup', logx=True)
  return paths
