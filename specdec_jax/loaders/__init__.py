"""Checkpoint loaders, one module per file format (and per architecture's names).

- `safetensors_folder`: a local Hugging Face folder (config.json + *.safetensors,
  sharded or not), read lazily tensor by tensor.
- `hf_gemma3`: Gemma 3 (text, or the text part of a multimodal checkpoint) from
  such a folder into our `ModelConfig` and params tree.
"""
