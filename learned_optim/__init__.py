"""learned_optim: trained L2O-DM, RNNprop and L2O-Scale networks as ``torch.optim`` optimizers.

    import learned_optim
    opt = learned_optim.L2ODM(model.parameters(), weights="dm-cl-il")
"""
__version__ = "0.1.0"

from .optimizer import L2ODM, L2OScale, LearnedOptimizer, RNNprop
from .rules import RULES, L2ODMRule, L2OScaleRule, RNNpropRule, Rule, build_rule
from .weights import (WeightsError, available_weights, load_rule, model_card, publish, read_metadata,
                      resolve_weights, save_weights, weights_digest)

__all__ = ["LearnedOptimizer", "L2ODM", "RNNprop", "L2OScale", "Rule", "RULES", "build_rule", "L2ODMRule",
           "RNNpropRule", "L2OScaleRule", "WeightsError", "available_weights", "load_rule", "model_card", "publish",
           "read_metadata", "resolve_weights", "save_weights", "weights_digest"]
