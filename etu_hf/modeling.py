"""Model plumbing: unwrapping, checks, the output head, hidden-state capture, the base distribution.

The chunked losses need the hidden states that enter the output head (``lm_head``) rather than the
logits, so that no ``[B, T, |V|]`` tensor is ever built. :class:`HeadInputCapture` records the head's
input during an ordinary forward through the (possibly DDP/DeepSpeed-wrapped) model and, with
``truncate=True``, hands the head an empty slice so that the model computes no logits at all.

The base distribution pi_b (docs/method.md, "The loss") comes from :class:`AdapterDisabledBase` for PEFT
models (the same model under ``disable_adapter()``, no second copy) or :class:`FrozenCopyBase` (a
frozen copy, optionally kept on CPU, or a user-given reference model).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Batch keys that are not model inputs (the trainer computes its own losses from them).
NON_MODEL_KEYS = ("labels", "shift_labels", "num_items_in_batch")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / compile wrappers (anything holding the real model in ``.module``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        else:
            return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the check cheap and safe
        return False
    return isinstance(unwrap_model(model), PeftModel)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers model inside any wrapper and PEFT model."""
    m = unwrap_model(model)
    if is_peft_model(m):
        m = m.get_base_model()
    return m


def check_causal_lm(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` is a decoder-only causal LM with an output head."""
    from transformers import GenerationMixin
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    m = causal_lm_of(model)
    name = type(m).__name__
    config = getattr(m, "config", None)
    head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    known = name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if getattr(config, "is_encoder_decoder", False) or head is None or not (known or isinstance(m, GenerationMixin)):
        raise TypeError(
            f"ETU needs a causal language model with an output head (next-token logits); got {name}. "
            "Load the model with transformers.AutoModelForCausalLM.from_pretrained(...)."
        )


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps final hidden states to logits (``lm_head``; a PEFT wrapper if adapted)."""
    return causal_lm_of(model).get_output_embeddings()


def output_head_name(model: nn.Module) -> str:
    """The attribute name of the output head (``lm_head`` for most causal LMs)."""
    head = output_head(model)
    return next((n.split(".")[-1] for n, m in causal_lm_of(model).named_modules() if m is head), "lm_head")


def base_head_module(head: nn.Module) -> nn.Module:
    """The head without adapters: ``get_base_layer()`` of a PEFT tuner layer, ``original_module`` of a
    ``modules_to_save`` wrapper, else ``head`` itself."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return head
    if isinstance(head, ModulesToSaveWrapper):
        return head.original_module
    if isinstance(head, BaseTunerLayer):
        return head.get_base_layer()
    return head


def output_vocab_size(model: nn.Module) -> int:
    """|V| of the model's next-token distribution (rows of the output head)."""
    head = base_head_module(output_head(model))
    weight = getattr(head, "weight", None)
    if weight is not None:
        shape = getattr(weight, "ds_shape", None) or weight.shape  # DeepSpeed ZeRO-3 keeps the full shape here
        if len(shape) == 2 and shape[0] > 0:
            return int(shape[0])
    config = causal_lm_of(model).config
    return int(config.get_text_config().vocab_size)


def check_tokenizer_matches(model: nn.Module, tokenizer: Any) -> None:
    """Raise ``ValueError`` if the tokenizer can produce ids the model has no embedding for."""
    if tokenizer is None or not hasattr(tokenizer, "__len__"):
        return
    vocab = output_vocab_size(model)
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's output layer has {vocab} rows: the tokenizer "
            "does not match the model. Load both from the same checkpoint (or call "
            "model.resize_token_embeddings(len(tokenizer)) if you added tokens on purpose)."
        )


def _first_float_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def head_fn(head: nn.Module, out_device: torch.device | None = None):
    """``h -> head(h)`` with ``h`` cast to the head's device and dtype (so it works outside autocast)
    and the logits moved to ``out_device``."""
    dtype = _first_float_dtype(head)
    device = next((p.device for p in head.parameters()), None)

    def apply(h: torch.Tensor) -> torch.Tensor:
        h = h.to(device=device or h.device, dtype=dtype or h.dtype)
        z = head(h)
        return z.to(out_device) if out_device is not None else z

    return apply


class HeadInputCapture:
    """Context manager that records the input of ``head`` during a forward pass.

    With ``truncate=True`` the head receives an empty slice (zero positions), so the model returns
    empty logits and never materialises ``[B, T, |V|]``; the recorded hidden states are then fed to
    the head chunk by chunk by the losses.
    """

    def __init__(self, head: nn.Module, truncate: bool = True):
        self.head = head
        self.truncate = truncate
        self.hidden: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            h, rest = args[0], args[1:]
        else:
            key = next(iter(kwargs))
            h, rest = kwargs[key], None
        self.hidden = h
        if not self.truncate:
            return None
        h_empty = h[..., :0, :]
        if rest is not None:
            return (h_empty, *rest), kwargs
        return args, {**kwargs, key: h_empty}

    def __enter__(self) -> HeadInputCapture:
        self._handle = self.head.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def result(self) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError("the model's output head was not called during the forward pass")
        return self.hidden


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a batch that go to the model's forward (labels removed; no cache)."""
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS and not k.startswith("pref_")}
    inputs["use_cache"] = False
    return inputs


def forward_hidden(model: nn.Module, head: nn.Module, batch: dict[str, Any], truncate: bool = True):
    """Run ``model`` on ``batch`` and return ``(hidden [B, T, H], outputs)``; see :class:`HeadInputCapture`."""
    with HeadInputCapture(head, truncate=truncate) as cap:
        outputs = model(**model_inputs(batch))
    return cap.result(), outputs


class BaseDistribution(abc.ABC):
    """The frozen base model pi_b, as final hidden states plus an output head.

    Subclasses implement :meth:`_forward` (a no-grad, eval-mode forward of the base model).
    """

    #: True when no second copy of the weights exists (PEFT adapters disabled).
    shares_weights: bool = False

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
    """pi_b of a PEFT model: the same model with its adapters disabled, in eval mode, without grad."""

    shares_weights = True

    def __init__(self, peft_model: nn.Module):
        self.model = unwrap_model(peft_model)
        self._head = output_head(self.model)
        self._base_head = base_head_module(self._head)

    @torch.no_grad()
    def _forward(self, batch: dict[str, Any], truncate: bool) -> tuple[torch.Tensor, Any]:
        with self.model.disable_adapter(), eval_mode(self.model):
            return forward_hidden(self.model, self._head, batch, truncate=truncate)

    def head(self, out_device: torch.device) -> Any:
        return head_fn(self._base_head, out_device)

    @contextlib.contextmanager
    def as_model(self) -> Iterator[nn.Module]:
        with self.model.disable_adapter():
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


def head_matches_logits(model: nn.Module, head: nn.Module, batch: dict[str, Any]) -> bool:
    """True when ``head(hidden) == logits`` for this model, i.e. the model does not post-process the
    head's output (logit soft-capping, scaling). Checked once before training."""
    with torch.no_grad(), eval_mode(model):
        h, out = forward_hidden(model, head, batch, truncate=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        again = head_fn(head, logits.device)(h)
    if again.shape != logits.shape:
        return False
    ref = logits.float()
    tol = 1e-4 if logits.dtype == torch.float32 else 2e-2
    scale = ref.abs().max().clamp_min(1.0)
    return bool(((again.float() - ref).abs().max() / scale) <= tol)
