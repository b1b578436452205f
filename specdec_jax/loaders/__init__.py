"""Checkpoint loaders: the only code that knows checkpoint file formats.

- `safetensors_folder`: a local Hugging Face folder (config.json + *.safetensors,
  sharded or not), read lazily tensor by tensor.
- `hf_gemma3`, `hf_gemma4`: such a folder's Gemma 3 / Gemma 4 (text, or the
  text part of a multimodal checkpoint) into our config and params tree.
- `orbax_gemma`: Gemma 3 in the `gemma` library's orbax layout.
- `hf_tokenizer`: tokenizer.model, else tokenizer.json, else None.
- `placement`: each tensor converted and placed (sharded) as it is read.
"""
