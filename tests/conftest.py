import os

# Tests run on CPU; fake 8 devices for the multi-device tests (must be set
# before jax is imported anywhere).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def _share_compiled_programs():
  """One persistent XLA compilation cache for the whole run: the pytest
  process, its xdist workers and every job a test starts in a subprocess
  (they inherit the environment). Tests build fresh jitted functions for the
  same tiny programs over and over; with the cache an identical program is
  compiled once per run. Measured 2026-11-28 (Zen 3 EPYC, 2 cores, one
  process, `python -m pytest -q tests/test_speculative.py` with
  JAX_COMPILATION_CACHE_DIR unset vs set to an empty folder): 754 s -> 552 s.
  A fresh folder per run (removed at exit), so a run never depends on the
  one before; SPECDEC_TEST_XLA_CACHE=<folder> keeps one across runs."""
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:   # a worker, or set by hand
    return
  folder = os.environ.get('SPECDEC_TEST_XLA_CACHE')
  if not folder:
    import atexit
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix='specdec-xla-cache-')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = folder
  # Every program, however quick to compile: the tiny models' programs take
  # well under jax's default 1 s threshold each, and there are thousands.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


_share_compiled_programs()

import jax  # noqa: E402
import pytest  # noqa: E402

from specdec_jax import config as config_lib  # noqa: E402
from specdec_jax.model import init_params  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: uses the real Gemma 3 270M (~20 s to load)')


@pytest.fixture(scope='session')
def tiny():
  cfg = config_lib.tiny()
  return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope='session')
def gemma():
  from specdec_jax.targets import load_target
  return load_target('gemma3_270m', param_dtype='float32')


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drop jax's compiled programs after each test module. The suite compiles
  hundreds of programs in one process, and XLA:CPU's JIT code mappings count
  against vm.max_map_count (65530 here): two full runs on 2026-11-27 aborted
  inside an XLA compile ("Fatal Python error: Aborted") late in the run,
  while the same tests pass alone."""
  yield
  jax.clear_caches()


# Where the suite's time goes (jax's own timers, per test): set
# SPECDEC_COMPILE_PROFILE=<folder> and each pytest process appends one JSON
# line per test (trace / lower / backend-compile seconds, compile count, wall)
# to <folder>/<pid>.jsonl; `python tools/compile_profile.py <folder>` sums them.
_PROFILE_DIR = os.environ.get('SPECDEC_COMPILE_PROFILE')
if _PROFILE_DIR:
  import json
  import time
  from jax import monitoring

  _EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace_s',
             '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
             '/jax/core/compile/backend_compile_duration': 'compile_s'}
  _current = {}

  def _on_duration(event, secs, **_):
    key = _EVENTS.get(event)
    if key and _current:
      _current[key] = _current.get(key, 0.0) + secs
      if key == 'compile_s':
        _current['compiles'] = _current.get('compiles', 0) + 1

  monitoring.register_event_duration_secs_listener(_on_duration)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    _current.clear()
    _current.update(test=item.nodeid, trace_s=0.0, lower_s=0.0, compile_s=0.0, compiles=0)
    start = time.perf_counter()
    yield
    _current['wall_s'] = time.perf_counter() - start
    os.makedirs(_PROFILE_DIR, exist_ok=True)
    with open(os.path.join(_PROFILE_DIR, f'{os.getpid()}.jsonl'), 'a') as f:
      f.write(json.dumps(_current) + '\n')
    _current.clear()
