#!/usr/bin/env bash
# job-shell.sh - the shell that runs every rule's command under the `slurm` profile.
#
# The profile sets the Snakemake resource `shell_exec` to this file, so Snakemake runs a
# job as `slurm/job-shell.sh -c "<rule command>"` instead of `bash -c "set -euo pipefail; ..."`.
# It does two things plain bash does not:
#
# 1. It survives SIGTERM until the command has finished. SLURM sends SIGTERM to every
#    process of a job step at the warning time (`--signal=TERM@300` in the profile), at the
#    time limit, on preemption and on `scancel`. The training harness (workflow/training.py)
#    then writes a checkpoint and exits with code 75. Plain bash would die at once, so the
#    Snakemake job process would report the job failed and end the job step while the
#    trainer is still writing, and on clusters that kill a job's leftover processes the
#    checkpoint would be lost. With a trap set, bash defers the signal until its foreground
#    child exits and then passes on the child's exit status (75), so the job fails cleanly,
#    Snakemake's `retries` resubmits it, and the retry resumes from the checkpoint.
# 2. It writes one line to the SLURM job log saying where the job ran (job id, partition,
#    GPUs and CPUs that SLURM granted), so a job's placement can be checked from its log.
#
# Anything but `-c COMMAND` is handed to bash unchanged.
set -euo pipefail
if [ "$#" -ne 2 ] || [ "$1" != "-c" ]; then
    exec bash "$@"
fi
printf '[job-shell] host=%s slurm_job_id=%s partition=%s slurm_gpus_on_node=%s cuda_visible_devices=%s slurm_cpus_per_task=%s\n' \
    "$(hostname)" "${SLURM_JOB_ID:-none}" "${SLURM_JOB_PARTITION:-none}" \
    "${SLURM_GPUS_ON_NODE:-0}" "${CUDA_VISIBLE_DEVICES:-none}" "${SLURM_CPUS_PER_TASK:-none}" >&2
# A trap that runs a command (not an empty one) is reset to the default in child processes,
# so the command itself still receives SIGTERM; this shell only waits for it.
trap 'echo "[job-shell] SIGTERM received: waiting for the command to checkpoint and exit" >&2' TERM
eval "$2"
