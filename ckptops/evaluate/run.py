"""``evaluate`` and ``compare``: the library functions behind ``ckptops eval``.

One evaluation = load a model (optionally steered by an ICV), answer every prompt greedily,
judge every answer, and optionally measure perplexity on a benign text, with the ICV still
applied (so the number describes the model as it would be deployed).

``compare`` evaluates two models on the same prompts, one after the other (only one model is in
memory at a time), and reports per-set differences B - A with paired 95% intervals. The ICV, if
given, is applied to the second model (B, the sanitized one): ``--compare ORIGINAL SANITIZED
--icv SANITIZED/icv.safetensors`` measures HDR + ICV against the original.

Example::

    from ckptops.evaluate.run import evaluate, compare
    report = evaluate("safe/", ["advbench_heldout.jsonl", "xstest_prompts.csv"], labels=["harmful", "auto"])
    print(report.table())
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ckptops.evaluate._errors import EvalError
from ckptops.evaluate.generate import generate
from ckptops.evaluate.judge import JudgeFunction, LoadedJudge, judge_outputs, load_judge
from ckptops.evaluate.perplexity import perplexity
from ckptops.evaluate.prompts import PromptSet, load_prompt_sets
from ckptops.evaluate.report import CompareReport, EvalReport, ModelEvaluation, PromptResult

ICV_FILENAME = "icv.safetensors"
DTYPES = ("float32", "bfloat16", "float16", "auto")

PromptSource = PromptSet | str | os.PathLike


def _prompt_sets(prompts: Sequence[PromptSource], labels: Sequence[str], limit: int | None) -> list[PromptSet]:
    if not prompts:
        raise EvalError("no prompt files given (use --prompts FILE)")
    if all(isinstance(p, PromptSet) for p in prompts):
        sets = list(prompts)  # type: ignore[arg-type]
        if limit is not None:
            sets = [PromptSet(s.name, s.path, s.prompts[:limit]) for s in sets]
        return sets  # type: ignore[return-value]
    if any(isinstance(p, PromptSet) for p in prompts):
        raise EvalError("pass either prompt files or PromptSet objects, not both")
    return load_prompt_sets([Path(p) for p in prompts], labels, limit=limit)  # type: ignore[arg-type]


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise EvalError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def _load(model_ref: str | os.PathLike, dtype: str, device: str, quiet: bool):
    """Load model and tokenizer the way the ICV tools do (safetensors only, one-line errors)."""
    from ckptops.icv.load import load_model

    loaded = load_model(model_ref, dtype=_torch_dtype(dtype), quiet=quiet, hash_weights=False)
    if device != "cpu":
        try:
            loaded.model.to(device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            loaded.close()
            raise EvalError(f"cannot move {model_ref} to device {device!r}: {' '.join(str(exc).split())}") from None
    return loaded


def _apply_icv(model: Any, icv: str | os.PathLike, alpha: float | None, rule: str | None = None):
    try:
        from ckptops.icv.patch import apply_icv
    except ImportError as exc:  # pragma: no cover - the ICV module ships with ckptops
        raise EvalError(f"--icv needs ckptops.icv.patch, which cannot be imported here ({exc})") from exc
    return apply_icv(model, icv, alpha=alpha, rule=rule)


def _evaluate_one(
    model_ref: str | os.PathLike,
    sets: list[PromptSet],
    judge: LoadedJudge,
    *,
    icv: str | os.PathLike | None,
    icv_alpha: float | None,
    max_new_tokens: int,
    icv_rule: str | None = None,
    batch_size: int,
    chat_template: bool | None,
    ppl: str | os.PathLike | None,
    ppl_window: int | None,
    ppl_stride: int | None,
    ppl_max_tokens: int | None,
    dtype: str,
    device: str,
    progress: bool,
    log: Callable[[str], None],
) -> ModelEvaluation:
    notes: list[str] = []
    folder = Path(model_ref)
    if icv is None and (folder / ICV_FILENAME).is_file():
        notes.append(f"{folder / ICV_FILENAME} exists but is not applied (pass --icv to apply it)")
    if icv is not None and not Path(icv).is_file():
        raise EvalError(f"{icv}: ICV file not found")
    log(f"loading {model_ref}")
    loaded = _load(model_ref, dtype, device, quiet=not progress)
    handle = None
    try:
        if icv is not None:
            handle = _apply_icv(loaded.model, icv, icv_alpha, icv_rule)
            log(f"applied ICV {icv} ({handle!r})")
        prompts = [p for s in sets for p in s.prompts]
        generations, stats = generate(
            loaded.model,
            loaded.tokenizer,
            [p.text for p in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            chat_template=chat_template,
            progress=progress,
            description=f"eval {folder.name or model_ref}",
        )
        judgements = judge_outputs(judge, [p.text for p in prompts], [g.output for g in generations])
        results = [
            PromptResult(
                set_name=p.set_name,
                row=p.row,
                label=p.label,
                prompt=p.text,
                output=g.output,
                verdict=j.verdict,
                reason=j.reason,
                new_tokens=g.new_tokens,
                finished=g.finished,
                meta=dict(p.meta),
            )
            for p, g, j in zip(prompts, generations, judgements)
        ]
        ppl_result = None
        if ppl is not None:
            ppl_result = perplexity(
                loaded.model,
                loaded.tokenizer,
                ppl,
                window=ppl_window,
                stride=ppl_stride,
                max_tokens=ppl_max_tokens,
                progress=progress,
            ).as_dict()
        generation = {
            "prompts": stats.prompts,
            "new_tokens": stats.new_tokens,
            "seconds": round(stats.seconds, 3),
            "tokens_per_second": round(stats.tokens_per_second, 2),
        }
        icv_info = None
        if handle is not None:
            icv_info = str(icv)
            generation["icv"] = {"rule": handle.rule, "alpha": handle.alpha, "strength": handle.strength, "layers": len(handle.layers)}
        return ModelEvaluation(
            model=str(model_ref),
            icv=icv_info,
            results=results,
            generation=generation,
            perplexity=ppl_result,
            notes=notes,
        )
    finally:
        if handle is not None:
            handle.remove()
        loaded.close()


def _preflight(device: str, icv, icv_alpha: float | None, ppl=None) -> None:
    """Device, ICV file, alpha and the perplexity file: checked before any model loads."""
    from ckptops.icv.file import check_alpha, check_strength, load_icv
    from ckptops.preflight import check_device
    from ckptops.safeio import open_regular

    check_device(device)
    if ppl is not None:
        os.close(open_regular(ppl, EvalError, "perplexity text file"))
    if icv_alpha is not None:
        check_alpha(icv_alpha)
    if icv is not None and isinstance(icv, (str, os.PathLike)) and Path(icv).is_file():
        vector = load_icv(icv)
        if icv_alpha is not None:
            vector = vector.with_application(alpha=icv_alpha)
        check_strength(vector, str(icv))


def _settings(sets: Sequence[PromptSet], max_new_tokens: int, batch_size: int, chat_template: bool | None, dtype: str, device: str) -> dict[str, Any]:
    return {
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "chat_template": "auto" if chat_template is None else chat_template,
        "dtype": dtype,
        "device": device,
        "prompt_sets": [{"name": s.name, "path": s.path, "n": len(s), "labels": s.labels} for s in sets],
    }


def _check_numbers(max_new_tokens: int, batch_size: int) -> None:
    if max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")


def evaluate(
    model: str | os.PathLike,
    prompts: Sequence[PromptSource],
    *,
    labels: Sequence[str] = (),
    icv: str | os.PathLike | None = None,
    icv_alpha: float | None = None,
    icv_rule: str | None = None,
    judge: str | JudgeFunction = "keyword",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat_template: bool | None = None,
    limit: int | None = None,
    ppl: str | os.PathLike | None = None,
    ppl_window: int | None = None,
    ppl_stride: int | None = None,
    ppl_max_tokens: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate one model folder on prompt files; see :mod:`ckptops.evaluate.run`.

    Args:
        model: a local transformers checkpoint folder (safetensors weights).
        prompts: prompt files (JSON lines / CSV) or :class:`PromptSet` objects.
        labels: ``--label`` values, paired with the files as in :func:`load_prompt_sets`.
        icv: an ICV file to apply while generating (and while measuring perplexity).
        icv_alpha: override the ICV file's alpha.
        icv_rule: override the ICV file's rule (``official``, ``paper`` or ``additive``).
        judge: ``"keyword"``, ``"module:function"``, an entry-point name, or a callable.
        chat_template: ``None`` uses the tokenizer's chat template when it has one.
        limit: the first ``limit`` prompts of each file only.
        ppl: a benign text file for perplexity.
        dtype: ``float32`` (default: what the ICV is specified in), ``bfloat16``, ``float16``
            or ``auto`` (the checkpoint's own).
    """
    _check_numbers(max_new_tokens, batch_size)
    _preflight(device, icv, icv_alpha, ppl)
    say = log or (lambda message: None)
    sets = _prompt_sets(prompts, labels, limit)
    loaded_judge = load_judge(judge)
    evaluation = _evaluate_one(
        model, sets, loaded_judge,
        icv=icv, icv_alpha=icv_alpha, icv_rule=icv_rule, max_new_tokens=max_new_tokens, batch_size=batch_size,
        chat_template=chat_template, ppl=ppl, ppl_window=ppl_window, ppl_stride=ppl_stride,
        ppl_max_tokens=ppl_max_tokens, dtype=dtype, device=device, progress=progress, log=say,
    )
    return EvalReport(
        evaluation=evaluation,
        judge=loaded_judge.name,
        settings=_settings(sets, max_new_tokens, batch_size, chat_template, dtype, device),
    )


def compare(
    original: str | os.PathLike,
    sanitized: str | os.PathLike,
    prompts: Sequence[PromptSource],
    *,
    labels: Sequence[str] = (),
    icv: str | os.PathLike | None = None,
    icv_alpha: float | None = None,
    icv_rule: str | None = None,
    judge: str | JudgeFunction = "keyword",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat_template: bool | None = None,
    limit: int | None = None,
    ppl: str | os.PathLike | None = None,
    ppl_window: int | None = None,
    ppl_stride: int | None = None,
    ppl_max_tokens: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CompareReport:
    """Evaluate ``original`` (A) and ``sanitized`` (B, with ``icv`` if given) on the same prompts.

    The report's deltas are B - A per prompt set and label, with Newcombe's paired 95% interval;
    the arguments are those of :func:`evaluate`.
    """
    _check_numbers(max_new_tokens, batch_size)
    _preflight(device, icv, icv_alpha, ppl)
    say = log or (lambda message: None)
    sets = _prompt_sets(prompts, labels, limit)
    loaded_judge = load_judge(judge)
    common = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template, ppl=ppl,
        ppl_window=ppl_window, ppl_stride=ppl_stride, ppl_max_tokens=ppl_max_tokens, dtype=dtype,
        device=device, progress=progress, log=say,
    )
    a = _evaluate_one(original, sets, loaded_judge, icv=None, icv_alpha=None, **common)
    b = _evaluate_one(sanitized, sets, loaded_judge, icv=icv, icv_alpha=icv_alpha, icv_rule=icv_rule, **common)
    return CompareReport(
        a=a,
        b=b,
        judge=loaded_judge.name,
        settings=_settings(sets, max_new_tokens, batch_size, chat_template, dtype, device),
    )
