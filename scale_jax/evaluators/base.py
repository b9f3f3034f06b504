"""What every evaluator shares: its name, how often the trainer runs it and its combinations."""
from scale_jax.evaluators import features


class Evaluator:
  """Built from config.evals.<name> (less `type`); called with an evaluators.Context, returns
  {combination name: {metric: value}}."""

  def __init__(self, name: str, config, every: int = 0, combinations=None):
    self.name, self.every = name, int(every)
    self.combinations = features.combinations(config, combinations)

  def combination_names(self) -> list:
    return [features.name(c) for c in self.combinations]

  def describe(self) -> str:
    """One line for the table's title: what is measured, how."""
    raise NotImplementedError

  def __call__(self, context) -> dict:
    raise NotImplementedError
