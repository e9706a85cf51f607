"""Settings that make ``sanitize`` do nothing, or harm: refused or warned about before any work.

A careful user wants to hear, before minutes of streaming, that ``--exclude`` matched no tensor
(or every one), that ``--layers`` names layers the model does not have, that a negative ``--scale``
*adds* the harm vector, that the harmful model is the base itself (tau = 0: nothing would change),
and, after the run, when the harm vector turned out to be zero where it was selected. Warnings go through
:mod:`warnings` (the CLI prints each as one ``warning:`` line).
"""

from __future__ import annotations

import re
import warnings

from ckptops.errors import UsageError
from ckptops.hdr.layers import layer_index

#: the paper and the official code use scale 3; far beyond it the update dwarfs the fine-tuning
#: it is meant to undo (``ckptops diagnose`` measures by how much)
LARGE_SCALE = 10.0


def check_sign(scale: float, force: bool) -> None:
    """A negative scale adds the harm vector: refused unless forced (also checked on a recipe
    before its run, and by ``run --check``)."""
    if scale < 0 and not force:
        raise UsageError(f"--scale {scale:g} is negative: it ADDS the harm vector (a more harmful model); "
                         "use a positive scale, or --force if that is really the intent")


def check_before_work(run) -> None:
    """Called once the inputs are open and planned (headers only), before any tensor data."""
    options, models = run.options, run.models
    scale = options.scale
    check_sign(scale, options.force)
    if scale > LARGE_SCALE:
        warnings.warn(f"--scale {scale:g} is far beyond the paper's 3: the update will likely damage the model "
                      "(run `ckptops diagnose` to see how far it moves the weights)", stacklevel=2)
    if scale == 0:
        warnings.warn("--scale 0: theta = theta_target, nothing will change (the output copies the target)", stacklevel=2)
    if models.base.root is not None and models.harmful.root is not None and \
            models.base.root.resolve() == models.harmful.root.resolve() and \
            set(models.base.shards) == set(models.harmful.shards):
        raise UsageError(f"--harmful {models.harmful.ref} is the same checkpoint as --base {models.base.ref}: "
                         "the harm vector tau = theta_H - theta_b is zero and nothing would change")
    names = list(models.target.tensors)
    warn_unmatched_excludes(options.exclude, models.target)
    if run.layers is not None:
        present = {i for i in (layer_index(n) for n in names) if i is not None}
        if present:
            count = max(present) + 1
            beyond = sorted(i for i in run.layers if i >= count)
            if beyond:
                raise UsageError(f"--layers {beyond[0]}: {models.target.ref} has {count} decoder layers (0-{count - 1})")
    if run.plan is not None:
        warn_if_nothing_takes_part(run.plan)


def warn_unmatched_excludes(patterns, target) -> None:
    """An ``--exclude`` pattern that matches no tensor of ``target`` (a typo) excludes nothing:
    say so (``tune`` shares this check)."""
    names = list(target.tensors)
    for pattern in patterns:
        compiled = re.compile(pattern)
        if not any(compiled.search(name) for name in names):
            warnings.warn(f"--exclude {pattern!r} matches no tensor of {target.ref}; nothing is excluded by it",
                          stacklevel=2)


def warn_if_nothing_takes_part(plan, outcome: str = "the output copies the target") -> None:
    """Say why no tensor takes part in HDR (then ``outcome``), naming the cause: without this,
    the run's drift figures would only show tau = 0 over zero values (``tune``'s candidates would
    all equal the target)."""
    if plan.hdr_tasks:
        return
    reasons = [task.reason for task in plan.tasks]
    total = len(reasons)
    if "excluded" in reasons:
        cause = f"--exclude excludes every tensor HDR could change ({reasons.count('excluded')} of {total})"
    elif "outside --layers" in reasons:
        cause = f"--layers leaves out every tensor HDR could change ({reasons.count('outside --layers')} of {total})"
    else:
        cause = "no tensor is floating point and shared by base, harmful and target"
    warnings.warn(f"{cause}: nothing takes part in HDR, so {outcome}", stacklevel=2)


def check_after_work(report) -> None:
    """Warn when HDR ran but changed no tensor: the selected harm vector was zero, i.e. harmful
    equals base wherever values were selected. Judged on the tensors changed, not on a threshold
    of 0: that only means at least 1 - k of |tau| is 0 (a LoRA theta_H covering few tensors) or
    k = 1, and the rest of tau still moves the target."""
    if report.tensors_changed == 0 and report.thresholds and report.parameters.get("scale") != 0:
        warnings.warn("the harm vector is zero on every selected value: --harmful is identical to --base there, "
                      "so the output equals the target; check that --harmful is the fine-tuned model",
                      stacklevel=2)
