"""Exit codes of ``replic train`` that schedulers and the workflow act on."""

# After a checkpoint on SIGTERM/SIGUSR1 (Slurm preemption or time limit): resubmit to continue.
EXIT_PREEMPTED = 75
# A NaN or infinite loss stopped the run; the last good checkpoint is kept.
EXIT_NONFINITE_LOSS = 3
# A write ran out of disk space (replic.io.DiskFullError, EX_IOERR); the previous files are kept.
EXIT_DISK_FULL = 74
