#!/bin/bash
# Multi-node fine-tuning with SLURM + `accelerate launch`: one launcher per node, one process per GPU.
#
#   sbatch examples/multinode/slurm_train.sh                        # FSDP2, Long-CLIP recipe
#   ENGINE=zero2 RECIPE=betaclip-vit-b16-ce sbatch examples/multinode/slurm_train.sh --train_data /data/sharegpt4v.json
#
# ENGINE picks the accelerate config next to this script: ddp | fsdp2 | zero2 | zero3 (docs/training.md, Scaling
# out, says which engine suits which variant). Arguments after the script name go to the trainer.
#SBATCH --job-name=hf-longclip
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail

ENGINE=${ENGINE:-fsdp2}
RECIPE=${RECIPE:-longclip-vit-b16}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/${RECIPE}-${ENGINE}}
CONFIG_DIR=${CONFIG_DIR:-${SLURM_SUBMIT_DIR:-.}/examples/multinode}  # sbatch runs a copy of this script
CONFIG=${CONFIG_DIR}/${ENGINE}.yaml
[ -f "$CONFIG" ] || { echo "no accelerate config $CONFIG (ENGINE: ddp, fsdp2, zero2, zero3)" >&2; exit 2; }

MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

EXTRA_LAUNCH=()
RESUME=(--resume_from_checkpoint latest)  # a requeued job continues from its newest checkpoint
case "$ENGINE" in
  zero2|zero3)
    EXTRA_LAUNCH=(--deepspeed_multinode_launcher standard)  # torchrun-style per node, no pdsh/hostfile
    RESUME=()  # DeepSpeed checkpoints are pickles: the trainer does not resume them
    ;;
esac

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1

# SLURM_NODEID is expanded by each task (on its own node), hence the single quotes around the inner command.
srun --kill-on-bad-exit=1 --ntasks="$SLURM_NNODES" --ntasks-per-node=1 bash -c '
  exec accelerate launch \
    --config_file "$0" \
    --num_machines "$SLURM_NNODES" --num_processes "$1" \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$2" --main_process_port "$3" \
    --rdzv_backend static --same_network "${@:4}"
' "$CONFIG" "$NUM_PROCESSES" "$MAIN_ADDR" "$MAIN_PORT" \
  ${EXTRA_LAUNCH[@]+"${EXTRA_LAUNCH[@]}"} \
  -m hf_longclip.train --config "$RECIPE" --output_dir "$OUTPUT_DIR" ${RESUME[@]+"${RESUME[@]}"} "$@"
