"""Amortized in-context PK models: synthetic prior, in-context forecaster, training, API.

- `sample_studies(key, n, PriorConfig())`: studies from the synthetic prior (`_prior`).
- `InContextPK`: encoder, study/individual latents, attention and physics decoders (`_model`).
- `TrainConfig`, `train`, `load_checkpoint`: pre-training with exact resume (`_train`).
- `forecast`, `generate`, `load_model`: zero-shot API on shipped checkpoints (`_forecast`).
- `PlainTransformer`, `LatentNeuralODE`: baselines of issue 6, kinds "transformer",
  "neural_ode" of the same training loop and harness (`_baselines`).
- `FlowGenerator`: flow-matching generator over PK parameter paths, kind "generator"
  (`_generator`).
- `evaluate_study`, `evaluate_population`: the leave-one-out real-data protocol (`_evaluate`).
"""

from ._baselines import LatentNeuralODE as LatentNeuralODE
from ._baselines import PlainTransformer as PlainTransformer
from ._evaluate import evaluate_population as evaluate_population
from ._evaluate import evaluate_study as evaluate_study
from ._evaluate import loo_targets as loo_targets
from ._forecast import forecast as forecast
from ._forecast import generate as generate
from ._forecast import load_model as load_model
from ._generator import FlowGenerator as FlowGenerator
from ._model import InContextPK as InContextPK
from ._model import ModelConfig as ModelConfig
from ._pk import concentrations as concentrations
from ._pk import superposition_2cmt as superposition_2cmt
from ._prior import PriorConfig as PriorConfig
from ._prior import Studies as Studies
from ._prior import sample_studies as sample_studies
from ._tokens import from_population as from_population
from ._train import CheckpointError as CheckpointError
from ._train import TrainConfig as TrainConfig
from ._train import load_checkpoint as load_checkpoint
from ._train import train as train
