"""Training the learned precision controller ("Don't Waste Bits!", issue #5).

  data.py     training text (never an evaluation text) and the token-frequency table
  traces.py   teacher-forced FP16 traces: features + distortion per width, chunked on disk
  train.py    Optax training on expected distortion + lambda * bits, Mesh data parallelism,
              Orbax checkpoints, budget calibration
  __main__.py the command line: python -m train_controller --budget-bits 3.0 --steps N

The inference side (the MLP, the controller file, the `learned` precision) is kvjax.controller.
"""
