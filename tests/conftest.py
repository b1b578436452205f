import os

# Tests run on CPU; fake 8 devices for the multi-device tests (must be set
# before jax is imported anywhere).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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
