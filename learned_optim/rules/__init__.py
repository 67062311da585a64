"""The update rules: plain ``nn.Module``s shared by the optimizers and the meta-trainer."""
from .base import Rule, State, lstm_cell
from .dm import L2ODMRule, log_and_sign
from .rnnprop import RNNpropRule
from .scale import L2OScaleRule

RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (L2ODMRule, RNNpropRule, L2OScaleRule)}


def _rule_class(name: str) -> type[Rule]:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"Unknown rule {name!r}; known rules: {sorted(RULES)}") from None


def build_rule(name: str, config: dict | None = None) -> Rule:
    """Instantiate a rule by registry name (``dm``, ``rnnprop``, ``scale``) with its fresh initialisation."""
    return _rule_class(name)(**(config or {}))


def stored_config(name: str, config: dict) -> dict:
    """A config read from a weight file or checkpoint, with the keys it predates set to what it meant."""
    return {**_rule_class(name).legacy_config, **config}


__all__ = ["Rule", "State", "RULES", "build_rule", "stored_config", "L2ODMRule", "RNNpropRule", "L2OScaleRule",
           "lstm_cell", "log_and_sign"]
