#!/bin/sh
# Issue #14's drafter levers at equal data (docs/BENCHMARKS.md section 6): for
# each NAME, train the MTP drafter on SHARDS with one setting changed, then
# bench_drafters on the held-out prompt sets. Sequential; rerunning resumes
# (a trained NAME is skipped, its training resumes from its workdir's
# checkpoints, an evaluation with a full table is kept). A running
# distill_data job is paused during each timed evaluation.
#
#   sh tools/drafter_levers.sh                      # every lever below
#   sh tools/drafter_levers.sh head8k greedy        # some of them
#   SHARDS=outputs/distill/gemma3_270m_literary PROMPTS=6 DRAFTERS=mtp,mtp+lookup \
#     sh tools/drafter_levers.sh finetune           # the shipped drafter, trained on
#                                                   # (configs/distill_data.py:literary)
#
# ~13-19 min of training + ~4 min of evaluation per lever on a 2-core CPU.
set -u
SHARDS=${SHARDS:-outputs/distill/gemma3_270m_v0}
OUT=${OUT:-outputs/levers}
PROMPTS=${PROMPTS:-3}          # held-out prompts per domain in the evaluation
DRAFTERS=${DRAFTERS:-mtp}      # the kinds evaluated with the trained drafter
flags() {
  case $1 in
    base) echo "" ;;
    depth2) echo "--config.num_layers=2" ;;
    depth4) echo "--config.num_layers=4" ;;
    kl) echo "--config.loss=kl" ;;
    head8k) echo "--config.draft_vocab_size=8192" ;;
    head16k) echo "--config.draft_vocab_size=16384" ;;
    greedy) echo "--config.shard_rows_kind=greedy" ;;
    sampled) echo "--config.shard_rows_kind=sampled" ;;
    width768) echo "--config.width=768 --config.hidden_dim=1536" ;;
    # Continue training the shipped drafter (its shape, a lower learning rate).
    finetune) echo "--config.init_from=specdec_jax/assets/gemma3_270m_mtp --config.learning_rate=5e-4 --config.warmup_steps=20 --config.eval_every=50 --config.checkpoint_every=50" ;;
    finetune_kl) echo "--config.init_from=specdec_jax/assets/gemma3_270m_mtp --config.learning_rate=5e-4 --config.warmup_steps=20 --config.eval_every=50 --config.checkpoint_every=50 --config.loss=kl" ;;
    *) echo "error: unknown lever $1 (base depth2 depth4 kl head8k head16k greedy sampled width768 finetune finetune_kl)" >&2
       exit 2 ;;
  esac
}
[ $# -gt 0 ] || set -- base depth2 kl head8k head16k greedy sampled width768
for name in "$@"; do flags "$name" > /dev/null || exit 2; done
mkdir -p "$OUT"
for name in "$@"; do
  if [ ! -f "$OUT/$name/drafter/drafter.json" ]; then
    # shellcheck disable=SC2046
    python -m experiments.run --config=configs/train_mtp.py --config.shards="$SHARDS" \
      --config.steps=300 --config.eval_every=100 --config.checkpoint_every=100 \
      --config.workdir="$OUT/$name" --config.output="$OUT/$name/drafter" $(flags "$name") \
      > "$OUT/$name.log" 2>&1 || { echo "error: training $name failed (see $OUT/$name.log)" >&2; exit 1; }
  fi
  grep -q '^| chat' "$OUT/eval_$name.log" 2>/dev/null && continue
  pid=$(pgrep -f 'configs/distill_data.py' | head -1)
  [ -n "$pid" ] && kill -STOP "$pid"
  python -m experiments.bench_drafters --drafters="$DRAFTERS" --mtp="$OUT/$name/drafter" \
    --domains=code,prose,chat --prompts="$PROMPTS" > "$OUT/eval_$name.log" 2>&1
  rc=$?
  [ -n "$pid" ] && kill -CONT "$pid"
  [ $rc -eq 0 ] || { echo "error: evaluating $name failed (see $OUT/eval_$name.log)" >&2; exit 1; }
done
