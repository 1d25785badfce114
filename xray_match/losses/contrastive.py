"""InfoNCE (paper: intermodal-contrastive-gaze, §3.1, Eq. (1)) over negatives from a sampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xray_match.samplers.negatives import NegativeSampler


def info_nce(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1): ``L_q = -log( exp(q.k+ / tau) / sum_{i=0..K} exp(q.k_i / tau) )``, averaged over queries.

    ``logits`` (B, 1+K) holds ``q.k`` with the positive in column 0 and masked entries at -inf.
    The paper prints the numerator without ``exp``; the sound reading (van den Oord et al., MoCo),
    which makes the fraction a softmax probability, has it. Returns ``(loss, accuracy)`` where
    accuracy is the fraction of queries whose positive scores highest (the paper's "accuracy").
    """
    scaled = logits / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(scaled.float(), target)
    acc = (scaled.argmax(dim=1) == 0).float().mean()
    return loss, acc


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE: image queries against text keys and text queries against image keys.

    Both directions are needed in the cross-modal setting: with only image queries the online
    text encoder would get no gradient once keys come from its momentum copy.
    """

    def __init__(self, sampler: NegativeSampler, temperature: float):
        # no default here: the one home of the temperature's default is MocoConfig.temperature
        super().__init__()
        self.sampler = sampler
        self.temperature = temperature

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        i2t, t2i = self.sampler.logits(outputs, batch["image_id"], batch["text_id"])
        loss_i, acc_i = info_nce(i2t, self.temperature)
        loss_t, acc_t = info_nce(t2i, self.temperature)
        pos = (outputs["image_emb"] * outputs["text_emb"]).sum(-1).mean()
        return {
            "nce_loss": (loss_i + loss_t) / 2,
            "acc": (acc_i + acc_t) / 2,
            "avg_similarity": pos.detach(),
            "negatives": torch.tensor(float(i2t.shape[1] - 1)),
        }

    @torch.no_grad()
    def after_step(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        self.sampler.update(outputs, batch["image_id"], batch["text_id"])
