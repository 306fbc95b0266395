"""What keeps a model near its past self: distillation from a frozen copy, EMA teachers, the EWC Fisher penalty."""

from clpeft.components.regularization.ema import DualTeacher, EMATeacher
from clpeft.components.regularization.exemplar_distillation import ExemplarDistillation
from clpeft.components.regularization.fisher_averaging import fisher_weighted_average
from clpeft.components.regularization.margin_ranking import margin_ranking_loss
from clpeft.components.regularization.output_sensitivity import output_sensitivity
from clpeft.components.regularization.path_integral import PathIntegral
from clpeft.components.regularization.previous_model import PreviousModel
from clpeft.components.regularization.quadratic_penalty import QuadraticPenalty
from clpeft.components.regularization.representation_consolidation import TaskVectorSum

__all__ = [
    "DualTeacher",
    "EMATeacher",
    "ExemplarDistillation",
    "fisher_weighted_average",
    "margin_ranking_loss",
    "output_sensitivity",
    "PathIntegral",
    "PreviousModel",
    "QuadraticPenalty",
    "TaskVectorSum",
]
