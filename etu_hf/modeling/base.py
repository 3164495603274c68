"""The base distribution pi_b (docs/method.md, "The loss").

:class:`AdapterDisabledBase` for PEFT models (the same model under ``disable_adapter()``, no second copy)
or :class:`FrozenCopyBase` (a frozen copy, optionally kept on CPU, or a user-given reference model).
"""

from __future__ import annotations

import abc
import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from etu_hf.modeling.head import (
    base_head_module,
    eval_mode,
    forward_hidden,
    head_fn,
    is_peft_model,
    output_head,
    unwrap_model,
)


class BaseDistribution(abc.ABC):
    """The frozen base model pi_b, as final hidden states plus an output head.

    Subclasses implement :meth:`_forward` (a no-grad, eval-mode forward of the base model).
    """

    @abc.abstractmethod
    def _forward(self, batch: dict[str, Any], truncate: bool) -> tuple[torch.Tensor, Any]:
        """(hidden states entering the head, model outputs) of a no-grad, eval-mode base forward."""

    def hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        """Hidden states ``[B, T, H]`` entering the base output head (no logits are computed)."""
        return self._forward(batch, truncate=True)[0]

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Full base logits ``[B, T, V]`` as the model returns them."""
        out = self._forward(batch, truncate=False)[1]
        return out.logits if hasattr(out, "logits") else out[0]

    @abc.abstractmethod
    def head(self, out_device: torch.device) -> Any:
        """``h -> base logits`` on ``out_device`` (see :func:`head_fn`)."""

    @contextlib.contextmanager
    def as_model(self) -> Iterator[nn.Module]:
        """A module that computes pi_b while the context is open (for evaluation and generation)."""
        yield self.model


class AdapterDisabledBase(BaseDistribution):
    """pi_b of a PEFT model: the same model with its adapters disabled, in eval mode, without grad
    (no second copy of the weights)."""

    def __init__(self, peft_model: nn.Module):
        self.model = unwrap_model(peft_model)
        self._head = output_head(self.model)
        self._base_head = base_head_module(self._head)

    @torch.no_grad()
    def _forward(self, batch: dict[str, Any], truncate: bool) -> tuple[torch.Tensor, Any]:
        with adapters_disabled(self.model), eval_mode(self.model):
            return forward_hidden(self.model, self._head, batch, truncate=truncate)

    def head(self, out_device: torch.device) -> Any:
        return head_fn(self._base_head, out_device)

    @contextlib.contextmanager
    def as_model(self) -> Iterator[nn.Module]:
        with adapters_disabled(self.model):
            yield self.model


class FrozenCopyBase(BaseDistribution):
    """pi_b as a separate frozen model: a copy of the trained model taken before training, or a
    user-given reference model. With ``device="cpu"`` (``frozen_on_cpu``) it stays on CPU and
    inputs and outputs move to where they are needed."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, copy_model: bool = True):
        base = copy.deepcopy(unwrap_model(model)) if copy_model else unwrap_model(model)
        base.requires_grad_(False)
        base.eval()
        if device is not None:
            base.to(device)
        self.model = base
        self.device = next(base.parameters()).device
        self._head = output_head(base)

    @torch.no_grad()
    def _forward(self, batch: dict[str, Any], truncate: bool) -> tuple[torch.Tensor, Any]:
        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with eval_mode(self.model):
            return forward_hidden(self.model, self._head, moved, truncate=truncate)

    def head(self, out_device: torch.device) -> Any:
        return head_fn(self._head, out_device)


def adapters_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """PEFT's ``disable_adapter()`` context of ``model`` (the base distribution), a no-op context for a
    model without adapters: the pattern of TRL's ``use_adapter(model, None)``."""
    m = unwrap_model(model)
    return m.disable_adapter() if is_peft_model(m) else contextlib.nullcontext()
