"""The Ray Tune layer of rsnl: the driver side of a study (docs/studies.md). The study's format (configs,
stored files, names, metrics) is rsnl.study; this package runs it.

  study        presets, command-line options, the smoke version, Tune's search space
  trainable    the function trainable (one Trainer per group member, exact resume)
  resources    joining Ray, GPU fail-fast, Ray's logs to a file
  stopping     SIGTERM and Ctrl-C: a clean stop in every phase, a second one ends the driver
  record       optuna.db: every finished trial, for optuna-dashboard, the report and the exit status
  checkpoints  resume after a kill at any moment: pruning, a failed restore, a moved experiment
  resume       how a resume goes on: Tune's saved state where whole, else rebuilt from rsnl's record
  progress     the console: one progress line and rsnl's own lines
  run          run or resume a study (launch.py's driver), one driver per experiment

This is the only package besides launch.py that imports Ray.
"""
