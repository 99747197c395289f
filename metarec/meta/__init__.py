"""Meta transfer with per-layer gradient rescaling (MetaRec §III-C, docs/design.md §4)."""

from metarec.meta.inner_loop import inner_loop
from metarec.meta.joint import joint_loss
from metarec.meta.outer import apply_meta_update, task_weight
from metarec.meta.rescale import (
    check_similarity_state,
    combine,
    descent_direction,
    smooth_similarities,
    softmax_weights,
    standardize,
    tensor_similarities,
)
from metarec.meta.run_task import TaskContext, TaskResult, run_task, source_loss_options
from metarec.meta.tasks import TaskSampler, TaskSpec, task_seed

__all__ = [
    "TaskContext",
    "TaskResult",
    "TaskSampler",
    "TaskSpec",
    "apply_meta_update",
    "check_similarity_state",
    "combine",
    "descent_direction",
    "inner_loop",
    "joint_loss",
    "run_task",
    "smooth_similarities",
    "softmax_weights",
    "source_loss_options",
    "standardize",
    "task_seed",
    "task_weight",
    "tensor_similarities",
]
