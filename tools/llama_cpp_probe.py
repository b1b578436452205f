"""Dev-time: does llama-cpp-python crash in `generate` on the Gemma 3 270M GGUF, per setting?

Runs inside experiments/bench_hf.py's venv, one setting per process (a
segfault then costs one run and shows as exit status 139):

    GGUF=$(python -c "from specdec_jax.gemma_gguf import default_gguf_path; print(default_gguf_path())")
    for s in default default_k4 ctx512 ctx2048 swa_full_off flash_on nbatch64 threads1; do
      /tmp/specdec_hf_venv/bin/python tools/llama_cpp_probe.py $GGUF $s; echo "$s exit $?"; done

Each prints three 32-token greedy generations from the same prompt ids and
`ok`; docs/BENCHMARKS.md section 2 records what it found.
"""
import sys, time, os
import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
gguf, name = sys.argv[1], sys.argv[2]
settings = {
  'default': dict(n_ctx=1024),
  'default_k4': dict(n_ctx=1024, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=4)),
  'ctx512': dict(n_ctx=512),
  'ctx2048': dict(n_ctx=2048),
  'swa_full_off': dict(n_ctx=1024, swa_full=False),
  'flash_on': dict(n_ctx=1024, flash_attn=True),
  'nbatch64': dict(n_ctx=1024, n_batch=64, n_ubatch=64),
  'threads1': dict(n_ctx=1024, n_threads=1),
}
kw = settings[name]
kw.setdefault('n_threads', os.cpu_count())
try:
  llm = llama_cpp.Llama(model_path=gguf, verbose=False, seed=0, **kw)
except TypeError as e:
  print(name, 'unsupported:', e); sys.exit(3)
ids = [2, 2063, 16713, 236769, 236749, 1473, 107]
for rep in range(3):
  llm.reset(); out=[]; t=time.perf_counter()
  for tok in llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
    out.append(int(tok))
    if tok == 1 or len(out) == 32: break
  print(name, rep, len(out), round(time.perf_counter()-t, 2), out[:8], flush=True)
print(name, 'ok', llama_cpp.__version__)
