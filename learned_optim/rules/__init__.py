"""The update rules: plain ``nn.Module``s shared by the optimizers and the meta-trainer."""
from .base import Rule, State, lstm_cell
from .dm import L2ODMRule, log_and_sign
from .rnnprop import RNNpropRule
from .scale import L2OScaleRule

RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (L2ODMRule, RNNpropRule, L2OScaleRule)}


def build_rule(name: str, config: dict | None = None) -> Rule:
    """Instantiate a rule by registry name (``dm``, ``rnnprop``, ``scale``) with its fresh initialisation."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"Unknown rule {name!r}; known rules: {sorted(RULES)}") from None
    return cls(**(config or {}))


__all__ = ["Rule", "State", "RULES", "build_rule", "L2ODMRule", "RNNpropRule", "L2OScaleRule", "lstm_cell",
           "log_and_sign"]
