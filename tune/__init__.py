"""The Ray Tune layer of rsnl: study configs, the trainable, resources, resume (docs/studies.md).

  study        study YAML -> validated StudyConfig, presets, search spaces
  trainable    the function trainable (one Trainer per group member, exact resume)
  resources    joining Ray, GPU fail-fast
  optuna_store the SQLite Optuna study written from finished trials
  run          run or resume a study (launch.py's driver)

This is the only package besides launch.py that imports Ray.
"""
