"""The parameter-golf trainer, readable source.

Read the modules in this order; each uses only the ones before it, and
`python tools/pack.py` joins them in this order into the one shipped train_gpt.py:

  settings     every setting, its range and profile values, checked once; the rules
  files        atomic writes, leftovers of killed writes, checksums
  shards       token shards and the manifest naming their tokenizer
  runtime      device, ranks, communication, compilation, logging, progress, signals
  data         validation tokens, the training samplers, the smoke corpus
  model        the GPT and its small shape config
  optimizer    MuonEq-R on the weight banks, AdamW on the rest
  artifact     GPTQ, the file format, the 16 MB accounting, export and load
  evaluation   exact byte counts, sliding windows, SLOT, score-first TTT
  training     schedules, EMA, late QAT, stop flags, the timed loop
  main         the run as a short list of phases, and the command line

`python -m trainer` runs the readable source; it behaves as the shipped file does.
"""

MODULES = ("settings", "files", "shards", "runtime", "data", "model", "optimizer", "artifact", "evaluation", "training", "main")
