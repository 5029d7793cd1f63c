"""rsnl: robust-similarity prompt learning for CLIP on few-shot data with noisy labels.

The library (this package) never imports Ray; the study layer lives in `tune/`.
Modules, one idea each:
  config      the validated trial configuration
  data        datasets (CoOp split JSON, torchvision DTD, Fashion-MNIST, digits, image folders)
  noise       few-shot sampling with injected label noise
  models      open_clip loading and the prompt matrix (text side)
  pretrain    the stand-in VLM rsnl pretrains on Fashion-MNIST (also `python -m rsnl.pretrain`)
  features    frozen image features, computed once, in a content-keyed disk cache
  zeroshot    the zero-shot baseline every trial reports
  similarity  prompt / feature / robust similarity and clean-sample selection
  ot          PromptOT: NLPrompt's optimal-transport selection
  manifest    noise manifests: a trial's draw as a file, and its replay
  train       the epoch loop, metrics and checkpoints (also `python -m rsnl.train`)
  files       atomic writes and locks
"""

__version__ = "0.1.0"
