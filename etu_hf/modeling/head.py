"""Model plumbing: unwrapping, the output head, hidden-state capture and the head probe.

The chunked losses need the hidden states that enter the output head (``lm_head``) rather than the
logits, so that no ``[B, T, |V|]`` tensor is ever built. :class:`HeadInputCapture` records the head's
input during an ordinary forward through the (possibly DDP/DeepSpeed-wrapped) model and, with
``truncate=True``, hands the head an empty slice so that the model computes no logits at all.

The base distribution pi_b lives in :mod:`etu_hf.modeling.base`; the one producer of scored states,
for the model and the base alike, in :mod:`etu_hf.modeling.states`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: Batch keys that are not model inputs (the trainer computes its own losses from them).
NON_MODEL_KEYS = ("labels", "shift_labels", "num_items_in_batch")


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


def head_matches_logits(model: nn.Module, head: nn.Module, batch: dict[str, Any]) -> bool:
    """True when ``head(hidden) == logits`` for this model, i.e. the model does not post-process the
    head's output (logit soft-capping, scaling). Prefer :func:`probe_hidden_states`, which finds the head."""
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


def probe_hidden_states(model: nn.Module, batch: dict[str, Any]) -> bool:
    """The head probe, run once on one batch: True when the losses and measurements may score the
    hidden states entering the output head (``head(hidden) == logits``), False when the model
    post-processes its logits and the full logits must be used. ``model`` may be wrapped (DDP, PEFT)."""
    device = next(model.parameters()).device
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return head_matches_logits(unwrap_model(model), output_head(model), moved)


def output_head_trainable(model: nn.Module) -> bool:
    """True when some parameter of the output head module (LoRA factors, modules_to_save, ...) is trained."""
    head = model.get_output_embeddings()
    if head is None:
        return True  # nothing to say about a model without one
    return any(p.requires_grad for p in head.parameters())


def output_head_adapted_without_resize(model: nn.Module) -> bool:
    """True when a PEFT model adapts its output head and the vocabulary has its configured size."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    adapted = head is not None and any(hasattr(head, attr) for attr in ("lora_A", "lora_magnitude_vector"))
    return adapted and head.weight.shape[0] == getattr(base.config, "vocab_size", -1)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / FSDP / ``torch.compile`` wrappers: accelerate's
    ``extract_model_from_parallel`` (mixed-precision forward hooks are kept)."""
    if not (hasattr(model, "module") or hasattr(model, "_orig_mod")):
        # Not wrapped (every wrapper holds the model in one of these). A fast path: accelerate reads
        # package metadata on every call (milliseconds), and this runs several times per step.
        return model
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


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
