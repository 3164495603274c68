"""Preference refinement: NPO, SimNPO and DPO losses, in-loop terms, and the ``etu-hf refine`` stage."""

from etu_hf.preference.losses import dpo_sigmoid_loss, npo_loss, sequence_logps, simnpo_loss
from etu_hf.preference.npo import NPOConfig, NPOTrainer

__all__ = ["NPOConfig", "NPOTrainer", "dpo_sigmoid_loss", "npo_loss", "sequence_logps", "simnpo_loss"]
