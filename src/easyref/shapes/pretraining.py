"""Temporary alias while the ShapesWorld modules move to easyref.training.steps."""
from easyref.training.steps import *  # noqa: F403
from easyref.training.steps import step_generator, step_rng, train  # noqa: F401
