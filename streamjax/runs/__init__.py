"""What every long job needs, written once: it survives kills, full disks and restarts.

workdir      one process per workdir (a lock); a restart only with the config the workdir was started with
signals      SIGTERM / SIGINT: save at the next safe point, then stop (Interrupted)
finite       NonFiniteError, for losses and NLLs that stop being finite
checkpoints  orbax checkpoints with digests; corrupt steps set aside
writes       atomic, fsynced result files; clear errors on a full disk or a corrupt file
provenance   the command and commit that made a result; config and token digests
plots        figures saved atomically, with their provenance as a footer
machine      resident memory, timed calls, memory bandwidth and matmul throughput
log          progress lines on stderr
"""
