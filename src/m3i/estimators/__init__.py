"""Estimators of the variational bound I(ẑ; z) ≥ H(z) + E[log p̂(z | ẑ)], one module each.

The family of p̂ picks the loss: Boltzmann (softmax cross-entropy over candidates), Gaussian
(squared error), UniGrad (SIM's dense form). Every module of this package registers its
estimator in :data:`ESTIMATORS` when imported; a new estimator is a new module.
"""
from ..registry import import_parts
from .base import ESTIMATORS, FORMS, Estimator, EstimatorCfg
from .boltzmann import batch_boltzmann, boltzmann
from .gaussian import gaussian
from .unigrad import target_correlation, unigrad

import_parts(__name__, __path__)

__all__ = ["ESTIMATORS", "FORMS", "Estimator", "EstimatorCfg", "batch_boltzmann", "boltzmann", "gaussian",
           "target_correlation", "unigrad"]
