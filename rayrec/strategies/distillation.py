"""Two-way knowledge distillation between SASRec's and the retriever's score distributions.

Both modules score the same candidates at each training position (target first, then
sampled negatives): ``out.sas_cand`` and ``out.ret_cand``, [M, C]. With temperature T,
each student matches the other's softened distribution, the teacher side detached:

    L = T^2 [ KL(p_sas || p_ret) (retriever learns)  +  KL(p_ret || p_sas) (SASRec learns) ]

(Hinton et al. 2015's T^2 keeps gradient scale independent of T). ``direction`` keeps one
of the two terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.config.joint import DistillationConfig


class Distillation(nn.Module):
    needs = frozenset({"cand_scores"})

    def __init__(self, cfg: DistillationConfig) -> None:
        super().__init__()
        self.weight, self.temperature, self.direction = cfg.weight, cfg.temperature, cfg.direction

    def forward(self, out) -> torch.Tensor:
        return self.weight * two_way_kd(out.sas_cand, out.ret_cand, self.temperature, self.direction)

    def stats(self) -> dict[str, float]:
        return {}


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), mean over rows; the teacher is detached.

    student, teacher  # [M, C] logits over the same candidates.
    """
    t = temperature
    log_p_teacher = F.log_softmax(teacher.detach().float() / t, dim=-1)
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


def two_way_kd(sas: torch.Tensor, ret: torch.Tensor, temperature: float, direction: str = "both") -> torch.Tensor:
    """KD to the retriever (SASRec teaches), to SASRec (the retriever teaches), or both."""
    loss = sas.new_zeros((), dtype=torch.float32)
    if direction in ("both", "to_retriever"):
        loss = loss + kd(ret, sas, temperature)
    if direction in ("both", "to_sasrec"):
        loss = loss + kd(sas, ret, temperature)
    return loss
