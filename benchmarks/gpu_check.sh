#!/usr/bin/env bash
# The GPU check of issue 14: one command, under 8 minutes on one GPU, that measures every CUDA code path.
#
#     bash benchmarks/gpu_check.sh            # from anywhere; PYTHON=... to choose the interpreter
#
# Each step has its own time limit; a step that fails or runs out of time is reported and the next one still
# runs. Every step writes benchmarks/results/<name>-gpu.json (`_common.write_result` adds -gpu on a GPU machine):
#   1. rollout.py: GPT-2-small shape, batch 256, bf16 (realistic and best-case rollouts vs generate)  -> rollout-gpu.json
#   2. ppo_iteration.py --device cuda: GPT-2-small shape, batch 128, bf16 (iteration vs its floor)    -> ppo_iteration-gpu.json
#   3. python -m agents.rlhf smollm2 --quick --ppo.device cuda: the real-LM job end to end (6 iterations), when
#      artifacts/smollm2-135m-instruct exists (SmolLM2 comes from the package registry, and its reward model and
#      judge are built from ../shared/data/imdb: a machine with neither cannot build them within the limit);
#      otherwise the embedded preset (`--quick`) as a stand-in; its report.json's timing  -> rlhf_smollm2-gpu.json
#                                                                                          or rlhf_quick-gpu.json
#   4. only with 2+ GPUs: scaling.py --device cuda, textenv workload, 1 vs 2 processes (NCCL)         -> scaling-gpu.json
#   5. only with 2+ GPUs: step 3's job under torchrun on 2 GPUs with the policy sharded (--ppo.shard, FSDP2, bf16)
#                                                                             -> runs/gpu_check_sharded/report.json
# The limits add up to 7.5 minutes on one GPU (model building for step 3 included), 10 minutes on two or more.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PY; nothing to check" >&2
    exit 1
fi
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "gpu_check: $NGPU GPU(s), python $PY"

FAILED=()
step() {  # step NAME SECONDS COMMAND...: run under a time limit, report the outcome
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

step rollout 110 "$PY" benchmarks/rollout.py --device cuda --dtype bf16 --preset gpt2-small --batch 256 --rounds 8
step ppo_iteration 120 "$PY" benchmarks/ppo_iteration.py --device cuda --dtype bf16 --preset gpt2-small --batch 128 \
    --warmup 2 --rounds 6

RLHF_DIR=runs/gpu_check_rlhf
rm -rf "$RLHF_DIR"
if [ -d artifacts/smollm2-135m-instruct ]; then RLHF=(rlhf_smollm2 smollm2); else RLHF=(rlhf_quick); fi
step "${RLHF[0]}" 150 "$PY" -m agents.rlhf "${RLHF[@]:1}" --quick --ppo.device cuda --ppo.run-dir "$RLHF_DIR"
if [ -f "$RLHF_DIR/report.json" ]; then
    "$PY" - "$RLHF_DIR/report.json" "${RLHF[@]}" <<'EOF' || FAILED+=("${RLHF[0]} json")
import json
import sys

sys.path.insert(0, "benchmarks")
from _common import write_result

record = json.load(open(sys.argv[1]))
extra = record.get("extra", {})
timing = record.get("timing") or extra.get("timing") or {}
summary = {k: {m: record[k].get(m) for m in ("reward_mean", "kl_mean", "distinct_2")}
           for k in ("before", "after") if isinstance(record.get(k), dict)}
iterations = 6
results = {"run_dir": sys.argv[1].rsplit("/", 1)[0], "timing": timing, "iterations": iterations,
           "ppo_s_per_iteration": timing.get("ppo_s", float("nan")) / iterations, **summary}
name, preset = sys.argv[2], sys.argv[3:]
sys.argv = ["-m", "agents.rlhf", *preset, "--quick", "--ppo.device", "cuda"]  # the command the JSON records
print(f"wrote {write_result(name, results, [], quick=True)}")
EOF
fi

if [ "$NGPU" -ge 2 ]; then
    step scaling_nccl 60 "$PY" benchmarks/scaling.py --device cuda --workloads textenv --nproc 1 2 --quick
    # the policy sharded over 2 GPUs (FSDP2, bf16 compute), the same short job as step 3; its report says it ran
    rm -rf runs/gpu_check_sharded
    step sharded_rlhf 150 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m agents.rlhf \
        "${RLHF[@]:1}" --quick --ppo.device cuda --ppo.shard --ppo.run-dir runs/gpu_check_sharded
    [ -f runs/gpu_check_sharded/report.json ] || FAILED+=("sharded_rlhf report")
else
    echo
    echo "=== scaling_nccl, sharded_rlhf: skipped (need 2 GPUs, found $NGPU)"
fi

echo
ls -l benchmarks/results/*-gpu.json 2>/dev/null
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "gpu_check: all steps passed"
