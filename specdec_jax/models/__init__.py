"""Model architectures beyond the Gemma 3 decoder in model.py, one file each.

- `gemma4`: the Gemma 4 text decoder (`Gemma4Config`, `Gemma4`).
- `moe`: the routed mixture-of-experts block Gemma 4 uses beside its MLP.
- `gemma4_assistant`: the network of Gemma 4's assistant (MTP) drafter; its
  drafter protocol wrapper is specdec_jax/assistant_drafter.py.
"""
