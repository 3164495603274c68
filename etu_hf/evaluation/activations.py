r"""Optional activation analysis (``--analyze_activations``): per-layer hidden-state statistics.

For every decoder layer :math:`\ell` and every attended position :math:`t`, with :math:`h` the layer's
output hidden state under the unlearned model and :math:`h^b` under the base model:

- ``updated_norm`` / ``base_norm``: mean of :math:`\|h_t\|_2` / :math:`\|h^b_t\|_2`,
- ``cosine``: mean of :math:`\cos(h_t, h^b_t)`.

The states are read with forward hooks that are always removed afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from etu_hf.modeling.adapters import decoder_layers
from etu_hf.modeling.head import eval_mode, model_inputs


class _Recorder:
    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[i] = (output[0] if isinstance(output, (tuple, list)) else output).detach()

        return hook

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


@torch.no_grad()
def activation_statistics(
    model: nn.Module, base_model_ctx: Any, batches: Iterable[dict[str, Any]]
) -> list[dict[str, float]]:
    """Per-layer ``{"layer", "base_norm", "updated_norm", "cosine"}`` over attended positions.

    ``base_model_ctx`` is a context manager yielding the base model (``BaseDistribution.as_model()``
    or a plain ``contextlib.nullcontext(base_model)``); it is entered once per batch.
    """
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), 3, dtype=torch.float64)
    count = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        attended = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        with eval_mode(model), _Recorder(layers) as rec:
            model(**model_inputs(batch))
        updated = rec.outputs
        with base_model_ctx() as base:
            base_layers = decoder_layers(base)
            with eval_mode(base), _Recorder(base_layers) as rec_b:
                base(**model_inputs({k: v.to(next(base.parameters()).device) for k, v in batch.items()}))
        for i, (h, hb) in enumerate(zip(updated, rec_b.outputs, strict=True)):
            h, hb = h[attended].double(), hb.to(h.device)[attended].double()
            sums[i, 0] += hb.norm(dim=-1).sum().cpu()
            sums[i, 1] += h.norm(dim=-1).sum().cpu()
            sums[i, 2] += torch.nn.functional.cosine_similarity(h, hb, dim=-1).sum().cpu()
        count += int(attended.sum())
    means = (sums / max(count, 1)).tolist()
    return [{"layer": i, "base_norm": b, "updated_norm": u, "cosine": c} for i, (b, u, c) in enumerate(means)]
