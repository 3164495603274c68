"""The regions of a training step for benchmarks/step_overhead.py: ``record_function`` ranges opened from hooks
and callbacks, and their exclusive times from the profiler's events."""

from __future__ import annotations

import sys
import time

import torch
from torch.autograd.profiler import record_function

#: The regions of a step, in the order of the breakdown ("other": the rest of the step: data, callbacks, ...).
REGIONS = ("trained forward", "base forward", "loss", "backward", "optimizer", "controller", "logging")


class Regions:
    """Named, nested ``record_function`` ranges entered and left from hooks and callbacks (one thread).
    While ``quiet``, forward hooks do not open their own range (the controller's probe forwards count as
    the controller)."""

    def __init__(self) -> None:
        self.stack: list[tuple[str, object]] = []
        self.quiet = False
        self.calls: dict[str, tuple[int, float]] = {}

    def enter(self, name: str) -> None:
        rf = record_function(name)
        rf.__enter__()
        self.stack.append((name, rf))

    def exit(self, name: str) -> None:
        if any(n == name for n, _ in self.stack):
            while self.stack:
                n, rf = self.stack.pop()
                rf.__exit__(None, None, None)
                if n == name:
                    return

    def wrap(self, fn, name: str, quiet: bool = False):
        """``fn`` inside the region ``name``; its calls and wall seconds are also counted over the whole run
        (``self.calls``), as the controller runs only every ``lambda_update_freq`` steps."""

        def wrapped(*args, **kwargs):
            self.enter(name)
            self.quiet, before = quiet or self.quiet, self.quiet
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                n, seconds = self.calls.get(name, (0, 0.0))
                self.calls[name] = (n + 1, seconds + time.perf_counter() - start)
                self.quiet = before
                self.exit(name)

        return wrapped


def instrument(trainer, regions: Regions, etu: bool):
    """Open the regions of :data:`REGIONS` around the trainer's parts; returns a function that undoes the
    module-level patches (the loss functions)."""
    from etu_hf.modeling.head import causal_lm_of

    lm = causal_lm_of(trainer.model)
    opened: list[str | None] = []

    def pre(module, args, kwargs):
        name = None
        if not regions.quiet:
            name = "trained forward" if torch.is_grad_enabled() else "base forward"
            regions.enter(name)
        opened.append(name)

    def post(module, args, kwargs, output):
        name = opened.pop() if opened else None
        if name is not None:
            regions.exit(name)

    lm.register_forward_pre_hook(pre, with_kwargs=True)
    lm.register_forward_hook(post, with_kwargs=True)
    trainer.accelerator.backward = regions.wrap(trainer.accelerator.backward, "backward")
    trainer.log = regions.wrap(trainer.log, "logging")
    undo = []
    if etu:
        if trainer.heldout_probe is not None:
            trainer.heldout_probe.measure = regions.wrap(trainer.heldout_probe.measure, "controller", quiet=True)
        for mod_name, mod in list(sys.modules.items()):
            if not mod_name.startswith("etu_hf.training") or mod is None:
                continue
            for fn_name in ("tilted_kl_loss", "chunked_nll"):
                fn = getattr(mod, fn_name, None)
                if callable(fn):
                    setattr(mod, fn_name, regions.wrap(fn, "loss"))
                    undo.append((mod, fn_name, fn))

    def restore():
        for mod, fn_name, fn in undo:
            setattr(mod, fn_name, fn)

    return restore


def breakdown(prof, steps: int) -> dict:
    """Seconds per step of each region (its exclusive CPU time: nested regions subtracted) and the top
    operators, from the profiler's events."""
    names = {*REGIONS, "step"}
    excl = dict.fromkeys(names, 0.0)

    def nested_total(event) -> float:
        total = 0.0
        for child in event.cpu_children:
            total += child.cpu_time_total if child.name in names else nested_total(child)
        return total

    for e in prof.events():
        if e.name in names:
            excl[e.name] += (e.cpu_time_total - nested_total(e)) / 1e6
    per_step = {name: excl[name] / steps for name in REGIONS}
    per_step["other"] = excl["step"] / steps
    per_step["total"] = sum(per_step.values())
    ops = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    top = [
        {"op": a.key, "self_seconds_per_step": a.self_cpu_time_total / 1e6 / steps, "calls_per_step": a.count / steps}
        for a in ops
        if a.key not in names
    ][:12]
    return {"steps": steps, "seconds_per_step": per_step, "top_ops": top}
