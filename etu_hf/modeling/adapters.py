"""What is trained: LoRA / DoRA adapters (PEFT), or a selection of the model's own parameters.

Nothing here names an architecture: decoder layers are found as the model's ``nn.ModuleList`` of
``num_hidden_layers`` blocks (Llama ``model.layers``, GPT-2 ``transformer.h``, Mistral, Qwen, ...),
and module names are matched as PEFT matches them (by suffix).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from etu_hf.modeling.head import causal_lm_of

logger = logging.getLogger(__name__)


def parse_ids(value: str | list[int] | None, flag: str) -> list[int] | None:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]`` (``None`` stays ``None``); ``ValueError`` naming ``flag`` otherwise."""
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return [int(v) for v in value]
    out: list[int] = []
    try:
        for part in str(value).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out += list(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError as err:
        raise ValueError(
            f"{flag}: cannot parse {value!r}; use comma-separated integers and ranges like 0,2,5-7"
        ) from err
    return out


def check_layer_ids(model: nn.Module, layer_ids: list[int], flag: str = "--layer_ids") -> list[nn.Module]:
    """The decoder layers ``layer_ids`` of ``model``; ``ValueError`` naming ``flag`` when out of range."""
    layers = decoder_layers(model)
    bad = [i for i in layer_ids if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(
            f"{flag}: layer(s) {bad} out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})"
        )
    return [layers[i] for i in layer_ids]


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes 4-bit layers subclass it) or transformers' Conv1D (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _module_suffixes(model: nn.Module) -> set[str]:
    return {name.split(".")[-1] for name, _ in model.named_modules() if name}


def _all_linear_names(model: nn.Module) -> list[str]:
    """What PEFT's ``"all-linear"`` selects: the names of the linear layers, without the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if _is_linear(m) and m is not head})


def lora_config(
    model: nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str = "all-linear",
    use_dora: bool = False,
    layer_ids: list[int] | None = None,
) -> Any:
    """A ``peft.LoraConfig`` for a causal LM, validated against ``model``.

    ``target_modules`` is ``"all-linear"`` or comma-separated module names; names the model does not
    have are an error naming ``--lora_target_modules`` (PEFT's own error comes only at wrapping).
    ``layer_ids`` restricts the adapters to those decoder layers (PEFT ``layers_to_transform``);
    ``use_dora`` gives DoRA (weight-decomposed LoRA).
    """
    from peft import LoraConfig

    targets: str | list[str] = target_modules
    if target_modules != "all-linear":
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
        if "all-linear" in targets:  # e.g. "all-linear,lm_head": PEFT's all-linear set plus the named modules
            targets = sorted(set(_all_linear_names(model)) | {t for t in targets if t != "all-linear"})
        missing = [t for t in targets if t not in _module_suffixes(model)]
        if missing or not targets:
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if _is_linear(m)})
            raise ValueError(
                f"--lora_target_modules: {missing or target_modules!r} not found in {type(model).__name__}; its "
                f"linear modules are {', '.join(linear)} (or use 'all-linear')."
            )
    kwargs: dict[str, Any] = {}
    if layer_ids is not None:
        layers = check_layer_ids(model, layer_ids)
        kwargs["layers_to_transform"] = layer_ids
        if targets == "all-linear":  # PEFT needs names with layers_to_transform: the layers' linear modules
            targets = sorted({n.split(".")[-1] for layer in layers for n, m in layer.named_modules() if _is_linear(m)})
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n.split(".")[-1] for n, m in model.named_modules() if m is head and n}
    if head_names & set(targets if isinstance(targets, list) else []) and getattr(
        model.config.get_text_config(), "tie_word_embeddings", False
    ):
        logger.info(
            "the output head is tied to the input embeddings: its LoRA changes the output projection only (what the "
            "tilted target needs); merge with etu_hf.merge_adapter, which unties first (PEFT's merge_and_unload "
            "would change the input embeddings too: docs/real_model.md)"
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def select_trainable(
    model: nn.Module,
    layer_ids: list[int] | None = None,
    name_keywords: list[str] | None = None,
    param_ids: list[int] | None = None,
) -> list[str]:
    """Train only the selected parameters of a model without adapters; everything else gets
    ``requires_grad=False`` (so no gradient or optimiser state is kept for it).

    - ``layer_ids``: parameters inside those decoder layers;
    - ``name_keywords``: parameters whose name contains one of the keywords (within the layers when
      both are given);
    - ``param_ids``: indices into ``model.named_parameters()`` (not combinable with ``name_keywords``).

    Returns the names of the trainable parameters. Raises ``ValueError`` naming the flag when the
    selection is empty or out of range.
    """
    if param_ids is not None and name_keywords:
        raise ValueError("--param_ids and --name_keywords select parameters in two ways; give one of them")
    named = list(model.named_parameters())
    chosen = {name for name, _ in named}
    if layer_ids is not None:
        layer_params = {id(p) for layer in check_layer_ids(model, layer_ids) for p in layer.parameters()}
        chosen = {name for name, p in named if id(p) in layer_params}
    if name_keywords:
        matched = {name for name in chosen if any(k in name for k in name_keywords)}
        if not matched:
            sample = ", ".join(name for name, _ in named[:6])
            raise ValueError(
                f"--name_keywords {','.join(name_keywords)!r} match no parameter"
                f"{' of the selected layers' if layer_ids is not None else ''}; names look like: "
                f"{sample}, ..."
            )
        chosen = matched
    if param_ids is not None:
        bad = [i for i in param_ids if not 0 <= i < len(named)]
        if bad:
            raise ValueError(f"--param_ids: {bad} out of range: the model has {len(named)} parameter tensors")
        chosen = {named[i][0] for i in param_ids} & chosen
    if not chosen:
        raise ValueError("the parameter selection (--layer_ids / --name_keywords / --param_ids) is empty")
    for name, p in named:
        p.requires_grad_(name in chosen)
    total = sum(p.numel() for _, p in named)
    trained = sum(p.numel() for name, p in named if name in chosen)
    logger.info(
        "training %d of %d parameter tensors (%.2f%% of the weights)", len(chosen), len(named), 100 * trained / total
    )
    return sorted(chosen)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a causal LM, found without architecture-specific names: the
    ``nn.ModuleList`` whose length is the config's ``num_hidden_layers`` (else the longest one)."""
    m = causal_lm_of(model)
    config = getattr(m, "config", None)
    n = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    lists = [mod for mod in m.modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    if not lists:
        raise ValueError(f"could not find the decoder layers of {type(m).__name__}")
    exact = [mod for mod in lists if len(mod) == n]
    return list((exact or sorted(lists, key=len, reverse=True))[0])
