"""Runs a job from a config file: python -m experiments.run --config=configs/<x>.py

Overrides: --config.<key>=<value>. Bad input ends with one `error:` line on
stderr and exit status 2; the job's summary is the last line on stdout.
"""
import json
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)


def _fail(msg: str) -> None:
  print(f'error: {msg}', file=sys.stderr)
  sys.exit(2)


def main(argv) -> None:
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if 'Traceback (most recent call last):' in lines:   # the config file raised: say why
      _fail(f'{lines[0].split(": Error")[0]}: {lines[-1]}')
    _fail(lines[0] if lines else type(e).__name__)
  except (KeyError, AttributeError) as e:
    # A locked ConfigDict reports an unknown key as AttributeError(KeyError('key')).
    key = str(e.args[0] if e.args else e).strip('"\'')
    _fail(f'unknown config key {key!r}; the config file lists the valid keys')
  except (ValueError, TypeError, OSError) as e:
    _fail(f'bad --config override: {e}')
  try:
    config = _CONFIG.value
    if config is None:
      _fail('--config=configs/<name>.py is required')
    config.get('job')
  except OSError as e:
    _fail(f'cannot load the config file: {str(e).splitlines()[-1].strip()}')
  from specdec_jax.errors import UserError
  from specdec_jax import jobs
  try:
    summary = jobs.run(config)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail('interrupted; finished batches are in the output file (resume=true continues)')
  from specdec_jax import runs
  if runs.is_writer():              # several processes: process 0 alone prints the summary
    print(json.dumps(summary))


if __name__ == '__main__':
  main(sys.argv)
