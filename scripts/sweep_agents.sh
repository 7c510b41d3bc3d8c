#!/usr/bin/env bash
# Create a W&B sweep from SWEEP.yaml and start one `wandb agent` per visible GPU, each pinned with
# CUDA_VISIBLE_DEVICES; with GPUS_PER_RUN=k, one agent per group of k GPUs instead, whose runs then
# train with DDP on their k GPUs (the sweep's config must leave trainer.devices at auto, as
# experiments/cifar10.yaml does). Waits for the agents; Ctrl-C stops them.
#
#   scripts/sweep_agents.sh SWEEP.yaml          (what `make sweep SWEEP=...` runs)
#
# Environment:
#   GPUS_PER_RUN=k       GPUs per run (default 1)
#   CUDA_VISIBLE_DEVICES the GPUs to use (default: all that `nvidia-smi -L` lists); none: one CPU agent
#   SWEEP_ID=E/P/ID      join this existing sweep instead of creating one (e.g. on a second machine)
#   WANDB_PROJECT        project of the new sweep (default: the sweep file's `project`, else uqdm)
#   WANDB_ENTITY         entity of the new sweep (default: your W&B default entity)
#   AGENT_COUNT=n        runs per agent before it exits (default: until the sweep is done)
#   LOG_DIR              where the agents' output goes (default runs/sweep-agents)
#   DRY_RUN=1            print the commands instead of running them (creates no sweep)
set -euo pipefail

if [[ $# -ne 1 || ! -f $1 ]]; then
    echo "usage: [GPUS_PER_RUN=k] [SWEEP_ID=ENTITY/PROJECT/ID] $0 SWEEP.yaml" >&2
    exit 2
fi
sweep_file=$1
per_run=${GPUS_PER_RUN:-1}
log_dir=${LOG_DIR:-runs/sweep-agents}
dry_run=${DRY_RUN:-0}
if ! [[ $per_run =~ ^[1-9][0-9]*$ ]]; then
    echo "GPUS_PER_RUN must be a positive integer, not '$per_run'" >&2
    exit 2
fi

# The GPUs: CUDA_VISIBLE_DEVICES as given, else every GPU nvidia-smi lists.
gpus=()
if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi > /dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi -L | sed -n 's/^GPU \([0-9]*\):.*/\1/p')
fi

# One group of GPUS_PER_RUN GPUs per agent; an empty group is a CPU-only agent.
groups=()
if [[ ${#gpus[@]} -eq 0 ]]; then
    echo "no GPU visible: starting one agent whose runs train on the CPU" >&2
    groups=("")
else
    if ((per_run > ${#gpus[@]})); then
        echo "GPUS_PER_RUN=$per_run but only ${#gpus[@]} GPU(s) visible: ${gpus[*]}" >&2
        exit 2
    fi
    for ((i = 0; i + per_run <= ${#gpus[@]}; i += per_run)); do
        groups+=("$(IFS=,; echo "${gpus[*]:i:per_run}")")
    done
    unused=$((${#gpus[@]} % per_run))
    if ((unused > 0)); then
        echo "GPUS_PER_RUN=$per_run: leaving the last $unused of ${#gpus[@]} GPUs unused" >&2
    fi
fi

# The sweep: given, or created now (its path is on wandb's "wandb agent ENTITY/PROJECT/ID" line).
sweep_id=${SWEEP_ID:-}
if [[ -z $sweep_id ]]; then
    project=${WANDB_PROJECT:-$(sed -n 's/^project:[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$sweep_file" | head -n 1)}
    create=(wandb sweep --project "${project:-uqdm}")
    [[ -n ${WANDB_ENTITY:-} ]] && create+=(--entity "$WANDB_ENTITY")
    create+=("$sweep_file")
    if [[ $dry_run == 1 ]]; then
        echo "${create[*]}"
        sweep_id=ENTITY/PROJECT/SWEEP_ID
    else
        output=$("${create[@]}" 2>&1 | tee /dev/stderr | sed 's/\x1b\[[0-9;]*m//g')
        sweep_id=$(sed -n 's/.*wandb agent \([^[:space:]]*\).*/\1/p' <<< "$output" | tail -n 1)
        if [[ -z $sweep_id ]]; then
            echo "could not read the sweep ID from wandb's output" >&2
            exit 1
        fi
    fi
fi

agent=(wandb agent)
[[ -n ${AGENT_COUNT:-} ]] && agent+=(--count "$AGENT_COUNT")
agent+=("$sweep_id")

pids=()
stop() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
    wait
}
trap 'stop; exit 130' INT TERM

[[ $dry_run == 1 ]] || mkdir -p "$log_dir"
for k in "${!groups[@]}"; do
    group=${groups[k]}
    log="$log_dir/${sweep_id//\//-}-agent$k.log"
    if [[ $dry_run == 1 ]]; then
        echo "CUDA_VISIBLE_DEVICES=$group ${agent[*]} > $log"
        continue
    fi
    echo "agent $k on GPUs [${group:-none}]: ${agent[*]} (output: $log)"
    CUDA_VISIBLE_DEVICES=$group "${agent[@]}" > "$log" 2>&1 &
    pids+=($!)
done
if [[ $dry_run != 1 ]]; then
    echo "more machines: run 'wandb agent $sweep_id' there (or: SWEEP_ID=$sweep_id make sweep)"
    wait
fi
