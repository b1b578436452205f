"""Dispatches a config to its job by `config.job`."""
from specdec_jax.errors import UserError


def run(config) -> dict:
  job = config.get('job', '')
  if job == 'generate':
    from specdec_jax import generation_job
    return generation_job.run(config)
  if job == 'train_target':
    from specdec_jax import target_training
    return target_training.run(config)
  if job == 'train_drafter':
    from specdec_jax import train
    return train.run(config)
  if job == 'distill_data':
    from specdec_jax import distill_data
    return distill_data.run(config)
  if job == 'sweep':
    from specdec_jax import sweep
    return sweep.run(config)
  raise UserError(f'unknown job {job!r}')
