""":func:`tune`, the library function behind ``ckptops tune``, and :class:`TuneSession`.

Order of work (every check that needs no model runs first, so bad input costs nothing):

1. check the options and read the prompt files; split them into tuning and held-out parts; open
   the checkpoints' headers (their content identity, the ``--exclude`` and ``--write-best``
   checks) and read ``OUT/trials.jsonl`` (a damaged log or other settings are refused here);
2. load the target once (transformers, float32) and plan HDR over the three checkpoints;
3. measure the unmodified target on the tuning prompts (the reference for the damage bounds and
   for KL);
4. for each candidate (a grid, or ``trials`` Optuna trials): write its HDR weights into the model
   in memory (:mod:`ckptops.tune.apply`), compute the ICV on that model once per HDR setting
   and apply it with the candidate's alpha (:mod:`ckptops.icv`), measure, log;
5. choose by the rule (:mod:`ckptops.tune.choose`), then measure the target, the shipped
   defaults and the choice on the held-out prompts;
6. write the report folder, and with ``write_best`` run the chosen recipe (sanitize + ICV).

A rerun with the same arguments continues from ``OUT/trials.jsonl``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ckptops.errors import UsageError
from ckptops.tune.choose import Limits, Trial, choose, pareto_front, rank_key, violations
from ckptops.tune.inputs import check_write_best, file_identity, open_models
from ckptops.tune.log import LOG_NAME, TrialLog
from ckptops.tune.measure import MeasureSettings, Measurement, measure, next_token_logprobs
from ckptops.tune.prompts import PromptSplit, load_split
from ckptops.tune.space import DEFAULT_ICV_ALPHA, DEFAULT_SCALE, DEFAULT_TOP_K, TARGET, Candidate, grid, parse_floats

REPORT_FORMAT = "ckptops.tune/1"
BASE_ROW = "base theta_b (reference)"


class TuneSession:
    """The target loaded once, with its HDR tensors rewritable per candidate and an ICV cache.

    ``model`` and ``tokenizer`` are the live transformers objects: after :meth:`set` they compute
    exactly what the candidate's sanitized checkpoint (with its ICV) would compute."""

    def __init__(self, base: str | os.PathLike, harmful: str | os.PathLike, target: str | os.PathLike, *,
                 scope: str = "global", exclude: Sequence[str] = (), icv_rule: str = "official",
                 icv_demos: str | os.PathLike | None = None, quiet: bool = True) -> None:
        import torch

        from ckptops.icv.demos import load_demos
        from ckptops.icv.load import load_model
        from ckptops.tune.apply import InMemoryHDR

        self.icv_rule = icv_rule
        self.pairs = load_demos(icv_demos)
        from ckptops.checkpoint.lora import split_base_plus_adapter

        parts = split_base_plus_adapter(os.fspath(target))  # BASE+ADAPTER: load BASE, merge in InMemoryHDR
        self.loaded = load_model(parts[0] if parts else target, dtype=torch.float32, quiet=quiet, hash_weights=False)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.hdr = InMemoryHDR(base, harmful, target, self.model, scope=scope, exclude=tuple(exclude))
        self._icvs: dict[tuple[float, float], Any] = {}
        self._weights: tuple[float, float] = (1.0, 0.0)  # (top_k, scale) now in the model: the target
        self._handle = None
        self.seconds = {"apply": 0.0, "select": 0.0, "icv": 0.0}

    def set(self, candidate: Candidate) -> None:
        """Make the model compute ``candidate``: its HDR weights, then its ICV (alpha > 0)."""
        from ckptops.icv.patch import apply_icv

        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        weights = (1.0, 0.0) if candidate.scale == 0.0 else candidate.hdr
        if weights != self._weights:
            if candidate.scale == 0.0:
                started = time.perf_counter()
                self.hdr.restore()
            else:
                started = time.perf_counter()
                self.hdr.selections(candidate.top_k)
                self.seconds["select"] += time.perf_counter() - started
                started = time.perf_counter()
                self.hdr.apply(candidate.scale, candidate.top_k)
            self.seconds["apply"] += time.perf_counter() - started
            self._weights = weights
        if candidate.alpha > 0:
            self._handle = apply_icv(self.model, self.icv_for(weights), alpha=candidate.alpha)

    def prepare(self, top_ks) -> None:
        """Find the thresholds of these top-k together (one selection pass serves them all)."""
        if top_ks:
            started = time.perf_counter()
            self.hdr.prepare(sorted(top_ks))
            self.seconds["select"] += time.perf_counter() - started

    def icv_for(self, weights: tuple[float, float]):
        """The ICV of the model with these HDR weights (computed once, on the model as it is now)."""
        from ckptops.icv.compute import compute_icv

        icv = self._icvs.get(weights)
        if icv is None:
            if weights != self._weights or self._handle is not None:
                raise RuntimeError("the ICV must be computed on the candidate's weights without an ICV applied")
            started = time.perf_counter()
            icv = compute_icv(self.model, self.tokenizer, self.pairs, rule=self.icv_rule, progress=False)
            self.seconds["icv"] += time.perf_counter() - started
            self._icvs[weights] = icv
        return icv

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.hdr.close()
        self.loaded.close()


@dataclass
class TuneResult:
    """What a tune run found (also written to ``OUT/report.json``)."""

    out: str
    chosen: Candidate | None
    least_damaging: Candidate | None
    trials: list[Trial]
    target: Measurement
    heldout: dict[str, Measurement] = field(default_factory=dict)
    written: str | None = None
    seconds: float = 0.0
    #: candidates measured by this run; the others were read from ``trials.jsonl``
    new_trials: int = 0

    def summary(self) -> str:
        logged = len(self.trials) - self.new_trials
        source = f" ({self.new_trials} new, {logged} from trials.jsonl)" if logged > 0 else ""
        lines = [f"tune: {len(self.trials)} candidate(s) measured{source}; report in {self.out}"]
        if self.chosen is None:
            lines.append("  no candidate met the damage bounds; nothing chosen"
                         + (f" (least damaging: {self.least_damaging.label()})" if self.least_damaging else ""))
        else:
            lines.append(f"  chosen: {self.chosen.label()}")
        for name, m in self.heldout.items():
            lines.append(f"  held-out {name:<34} openings {100 * m.openings:5.1f}%  refusal {100 * m.refusal:5.1f}%  "
                         f"broken {100 * m.broken:5.1f}%" + (f"  KL {m.kl:.4f}" if m.kl is not None else "")
                         + (f"  ppl {m.perplexity:.3f}" if m.perplexity is not None else ""))
        if self.written:
            lines.append(f"  wrote the chosen model to {self.written}")
        return "\n".join(lines)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / LOG_NAME).is_file():
        raise UsageError(f"{out}: a non-empty folder without {LOG_NAME} (not a tune report); use another --out")


def _check_limits(max_broken_increase: float, max_kl: float, max_ppl_increase: float | None) -> Limits:
    for name, value in (("--max-broken-increase", max_broken_increase), ("--max-kl", max_kl),
                        ("--max-ppl-increase", max_ppl_increase)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")
    return Limits(max_broken_increase, max_kl, max_ppl_increase)


def _objective(m: Measurement, target: Measurement, limits: Limits) -> float:
    """One number for Optuna that orders like the choice rule: failing the bounds costs more than
    any qualifying outcome; then compliance openings, then refusals, then broken answers."""
    penalty = 10.0 if violations(Trial(TARGET, m), target, limits) else 0.0
    return penalty + m.openings + 1e-3 * (1 - m.refusal) + 1e-6 * m.broken


def _identity(ref: str | os.PathLike) -> str:
    """A model reference as the recipe records it: local paths absolute (the recipe runs from any
    folder), each part of BASE+ADAPTER on its own; Hub ids as given."""
    from ckptops.checkpoint.lora import split_base_plus_adapter

    parts = split_base_plus_adapter(os.fspath(ref))
    if parts is not None:
        return "+".join(_identity(part) for part in parts)
    path = Path(ref)
    return str(path.resolve()) if path.exists() else str(ref)


def tune(
    base: str | os.PathLike,
    harmful: str | os.PathLike,
    target: str | os.PathLike,
    harmful_prompts: str | os.PathLike,
    benign_prompts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    holdout: float | None = None,
    holdout_harmful: str | os.PathLike | None = None,
    holdout_benign: str | os.PathLike | None = None,
    scales: Sequence[float] | str = (0.5, 1.0, 2.0, 3.0, 4.0),
    top_ks: Sequence[float] | str = (0.05, 0.10, 0.20),
    icv_alphas: Sequence[float] | str = (0.0,),
    icv_rule: str = "official",
    icv_demos: str | os.PathLike | None = None,
    trials: int | None = None,
    max_broken_increase: float = 0.02,
    max_kl: float = 0.1,
    max_ppl_increase: float | None = None,
    ppl: str | os.PathLike | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    chat_template: bool | None = None,
    limit: int | None = None,
    seed: int = 0,
    scope: str = "global",
    exclude: Sequence[str] = (),
    judge: str | Callable = "keyword",
    write_best: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    session: TuneSession | None = None,
    measure_base: bool = False,
) -> TuneResult:
    """Search HDR scale / top-k and ICV alpha against behaviour; see :mod:`ckptops.tune.run`.

    Args:
        base, harmful, target: the three checkpoints (as for ``sanitize``).
        harmful_prompts, benign_prompts: prompt files (JSON lines / CSV; a ``label`` column keeps
            only the matching rows).
        out: the report folder (created; a rerun continues from its ``trials.jsonl``).
        holdout: fraction of each file held out (seeded; default 0.5), unless ``holdout_harmful``
            and ``holdout_benign`` name separate held-out files (then it must not be given).
        scales, top_ks, icv_alphas: the grid (lists or comma-separated text); alpha 0 = no ICV.
        trials: run this many Optuna (TPE, seeded) trials over the grid's values instead of the
            whole grid.
        max_broken_increase, max_kl, max_ppl_increase: the damage bounds of the choice rule.
        limit: at most this many prompts per part and label (a seeded sample).
        judge: as for ``ckptops eval`` (``keyword``, ``module:function``, or a callable).
        write_best: run the chosen recipe (sanitize + ICV) into this folder.
        session: an open :class:`TuneSession` to reuse (its models must be these).
        measure_base: also measure the base theta_b on the held-out prompts (a reference row; it
            loads theta_b beside the target, so it needs the model's memory twice).
    """
    from ckptops.evaluate.judge import load_judge
    from ckptops.hdr.plan import SCOPES
    from ckptops.icv.file import get_rule

    say = log or (lambda message: None)
    started = time.perf_counter()
    # 1. every check that needs no model
    scale_list = parse_floats(scales, "--scales")
    top_k_list = parse_floats(top_ks, "--top-ks")
    alpha_list = parse_floats(icv_alphas, "--icv-alphas")
    candidates = grid(scale_list, top_k_list, alpha_list)
    limits = _check_limits(max_broken_increase, max_kl, max_ppl_increase)
    if max_ppl_increase is not None and ppl is None:  # no perplexity is measured: the bound would bound nothing
        warnings.warn(f"--max-ppl-increase {max_ppl_increase:g} has no effect without --ppl (no perplexity is "
                      "measured); it is ignored")
        limits = Limits(max_broken_increase, max_kl, None)
    if scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    get_rule(icv_rule)
    if max_new_tokens < 1 or batch_size < 1:
        raise UsageError("--max-new-tokens and --batch-size must be at least 1")
    if trials is not None and trials < 1:
        raise UsageError(f"--trials must be at least 1, got {trials}")
    from ckptops.checkpoint.lora import split_base_plus_adapter

    parts = split_base_plus_adapter(os.fspath(target)) or (target,)
    for role, ref in (("base", base), ("harmful", harmful)) + tuple(("target", p) for p in parts):
        if not Path(ref).exists() and "/" not in str(ref):
            raise UsageError(f"--{role} {ref}: no such model folder")
    if measure_base:
        _check_base_loadable(base)
    if ppl is not None and not Path(ppl).is_file():
        raise UsageError(f"--ppl {ppl}: text file not found")
    if icv_demos is not None and not Path(icv_demos).is_file():
        raise UsageError(f"--icv-demos {icv_demos}: file not found")
    out_path = Path(out)
    _check_out(out_path)
    identities, roots = open_models(base, harmful, target, scope=scope, exclude=exclude)  # headers only
    if write_best is not None:
        check_write_best(write_best, out_path, roots)
    split = load_split(harmful_prompts, benign_prompts, holdout=holdout, holdout_harmful=holdout_harmful,
                       holdout_benign=holdout_benign, seed=seed, limit=limit)
    loaded_judge = load_judge(judge)
    if trials is not None and trials >= len(candidates):
        trials = None  # the whole grid is no more work
    if trials is not None:
        try:
            import optuna  # noqa: F401
        except ImportError:
            from ckptops.errors import MissingExtraError

            raise MissingExtraError("--trials needs optuna: pip install -e '.[tune]' (in a clone of ckptops)") from None
    settings = MeasureSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template,
                               ppl=str(ppl) if ppl is not None else None)
    log_settings = {
        **identities,  # the models by content: the same paths with other files are other models
        "prompts": {part: [[p.label, p.text] for p in group] for part, group in
                    (("tune_harmful", split.tune_harmful), ("tune_benign", split.tune_benign),
                     ("held_harmful", split.held_harmful), ("held_benign", split.held_benign))},
        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat_template": chat_template,
        "ppl": file_identity(ppl), "judge": loaded_judge.name, "scope": scope,
        "exclude": list(exclude), "icv_rule": icv_rule,
        "icv_demos": file_identity(icv_demos),
    }
    trial_log = TrialLog(out_path, log_settings)  # a damaged log or other settings: refused before the model loads
    say(f"tune: {len(split.tune_harmful)} harmful + {len(split.tune_benign)} benign tuning prompts, "
        f"{len(split.held_harmful)} + {len(split.held_benign)} held out; "
        f"{trials if trials is not None else len(candidates)} candidate(s)")

    # 2. the model, once
    own_session = session is None
    if session is None:
        say(f"loading {target}")
        session = TuneSession(base, harmful, target, scope=scope, exclude=exclude, icv_rule=icv_rule,
                              icv_demos=icv_demos, quiet=not progress)
    try:
        return _search(session, split, candidates, trials, limits, settings, loaded_judge, trial_log, out_path,
                       seed=seed, scope=scope, exclude=list(exclude), icv_rule=icv_rule, icv_demos=icv_demos,
                       alphas=alpha_list, models={"base": _identity(base), "harmful": _identity(harmful),
                                                  "target": _identity(target)},
                       write_best=write_best, progress=progress, say=say, started=started,
                       measure_base=measure_base)
    finally:
        if own_session:
            session.close()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_base_loadable(base: str | os.PathLike) -> None:
    """``--measure-base`` loads theta_b with transformers after the search: a local folder that
    cannot be loaded (HDR itself needs only its safetensors) is refused before any model loads."""
    folder = Path(base)
    if not folder.is_dir():
        return  # a Hub reference: resolved when it is loaded
    missing = [what for what, ok in (("config.json", (folder / "config.json").is_file()),
                                     ("tokenizer", any((folder / f).is_file() for f in TOKENIZER_FILES))) if not ok]
    if missing:
        raise UsageError(f"--measure-base: {base} has no {' and no '.join(missing)}, so transformers cannot run it; "
                         "leave --measure-base out or give a complete model folder")


def _measure_base(base: str, split: PromptSplit, judge, settings: MeasureSettings, reference, *,
                  say: Callable[[str], None], quiet: bool) -> Measurement | None:
    """theta_b itself on the held-out prompts: what fully undoing the fine-tune would give, the
    yardstick for the candidates' figures (a target bound stricter than the base's own figures
    asks HDR for more than undoing the fine-tune). Loaded beside the target, so it needs the
    model's memory a second time; its own tokenizer and chat template, as a user would run it."""
    import torch

    from ckptops.errors import CkptopsError
    from ckptops.icv.load import load_model

    say(f"tune: loading the base {base} to measure it on the held-out prompts")
    try:
        loaded = load_model(base, dtype=torch.float32, quiet=quiet, hash_weights=False)
    except CkptopsError as exc:  # the search's work is logged and reported; only this row is lost
        say(f"warning: --measure-base: {exc}; the held-out table has no base row")
        return None
    try:
        harmful, benign = split.part("heldout")
        output = loaded.model.get_output_embeddings()
        same_vocab = output is not None and reference is not None and output.weight.shape[0] == reference.shape[-1]
        return measure(loaded.model, loaded.tokenizer, harmful, benign, judge, settings,
                       reference_logprobs=reference if same_vocab else None)  # KL needs the target's vocabulary
    finally:
        loaded.close()


def _search(session: TuneSession, split: PromptSplit, candidates: list[Candidate], trials: int | None,
            limits: Limits, settings: MeasureSettings, judge, trial_log: TrialLog, out: Path, *, seed: int,
            scope: str, exclude: list[str], icv_rule: str, icv_demos, alphas: list[float], models: dict[str, str],
            write_best, progress: bool, say: Callable[[str], None], started: float,
            measure_base: bool = False) -> TuneResult:
    from tqdm.auto import tqdm

    model, tokenizer = session.model, session.tokenizer

    def run_one(split_name: str, candidate: Candidate, reference) -> Measurement:
        found = trial_log.get(split_name, candidate)
        if found is not None:
            return found
        begun = time.perf_counter()
        before = dict(session.seconds)
        session.set(candidate)
        harmful, benign = split.part(split_name)
        measurement = measure(model, tokenizer, harmful, benign, judge, settings, reference_logprobs=reference)
        for key, value in session.seconds.items():  # model work this trial caused: select, apply, icv
            measurement.seconds[key] = value - before[key]
        measurement.seconds["total"] = time.perf_counter() - begun
        trial_log.add(split_name, candidate, measurement)
        return measurement

    # 3. the reference: the unmodified target
    session.set(TARGET)
    reference = next_token_logprobs(model, tokenizer, [p.text for p in split.tune_benign],
                                    batch_size=settings.batch_size, chat_template=settings.chat_template)
    target_m = run_one("tune", TARGET, None)
    target_m.kl = 0.0

    # 4. the candidates; the thresholds of every top-k still to be measured first, in one pass
    session.prepare({c.top_k for c in candidates if c.scale != 0.0 and trial_log.get("tune", c) is None})
    measured: dict[str, Trial] = {}
    fresh: set[str] = set()  # measured by this run, not read from the log
    total = trials if trials is not None else len(candidates)
    logged = min(total, sum(1 for c in candidates if trial_log.get("tune", c) is not None))
    # trials read from the log start the bar (initial), so that its rate and ETA count new work only
    bar = tqdm(total=total, initial=logged, desc="tune", unit="trial", disable=not progress, dynamic_ncols=True)

    def evaluate(candidate: Candidate) -> Measurement:
        bar.set_postfix_str(f"scale {candidate.scale:g} top-k {candidate.top_k:g} alpha {candidate.alpha:g}")
        cached = trial_log.get("tune", candidate) is not None
        m = run_one("tune", candidate, reference)
        measured[candidate.key] = Trial(candidate, m)
        if not cached:
            fresh.add(candidate.key)
            bar.update(1)
        return m

    try:
        if trials is None:
            for candidate in candidates:
                evaluate(candidate)
        else:
            _optuna_search(candidates, trials, seed, lambda c: evaluate(c), trial_log, target_m, limits, alphas)
    finally:
        bar.close()

    # 5. choose among every tuning trial in the log (a rerun with more values extends the search),
    #    then the held-out figures
    for candidate, m in trial_log.logged("tune"):
        if candidate != TARGET and candidate.key not in measured:
            measured[candidate.key] = Trial(candidate, m)
            alphas = sorted(set(alphas) | {candidate.alpha})
    trial_list = list(measured.values())
    chosen_trial, least = choose(trial_list, target_m, limits)
    chosen = chosen_trial.candidate if chosen_trial is not None else None
    say("tune: " + (f"chosen {chosen.label()}" if chosen else "no candidate met the damage bounds"))
    rows: list[tuple[str, Candidate]] = [("target (unchanged)", TARGET),
                                         ("defaults: HDR scale 3, top-k 0.1", Candidate(DEFAULT_TOP_K, DEFAULT_SCALE, 0.0))]
    if any(a > 0 for a in alphas):
        rows.append(("defaults + ICV alpha 0.12", Candidate(DEFAULT_TOP_K, DEFAULT_SCALE, DEFAULT_ICV_ALPHA)))
    if chosen is not None:
        rows.append((f"chosen: {chosen.label()}", chosen))
    session.set(TARGET)
    held_reference = next_token_logprobs(model, tokenizer, [p.text for p in split.held_benign],
                                         batch_size=settings.batch_size, chat_template=settings.chat_template)
    heldout: dict[str, Measurement] = {}
    held_bar = tqdm(total=len(rows) + int(measure_base), desc="held-out", unit="model", disable=not progress,
                    dynamic_ncols=True)
    with held_bar:
        for name, candidate in rows:
            m = run_one("heldout", candidate, None if candidate == TARGET else held_reference)
            if candidate == TARGET:
                m.kl = 0.0
            heldout[name] = m
            held_bar.update(1)
            if candidate == TARGET and measure_base:  # the reference row right below the target's
                base_m = trial_log.get_reference("heldout", "base")
                if base_m is None:
                    base_m = _measure_base(models["base"], split, judge, settings, held_reference, say=say,
                                           quiet=not progress)
                    if base_m is not None:
                        trial_log.add_reference("heldout", "base", base_m)
                if base_m is not None:
                    heldout[BASE_ROW] = base_m
                held_bar.update(1)

    # 6. the report folder
    result = TuneResult(out=str(out), chosen=chosen, least_damaging=least.candidate if least else None,
                        trials=sorted(trial_list, key=rank_key), target=target_m, heldout=heldout,
                        new_trials=len(fresh))
    _write_report(result, split, limits, out, models=models, scope=scope, exclude=exclude, icv_rule=icv_rule,
                  icv_demos=icv_demos, write_best=write_best, session=session)
    if write_best is not None:
        if chosen is None:
            say("tune: no candidate chosen, so --write-best wrote nothing")
        else:
            from ckptops.recipe import load_recipe, run_recipe

            say(f"tune: writing the chosen model to {write_best}")
            session.set(TARGET)
            run_recipe(load_recipe(out / "recipe.toml"), out=str(write_best), progress=progress)
            result.written = str(write_best)
    result.seconds = time.perf_counter() - started
    return result


def _optuna_search(candidates: list[Candidate], trials: int, seed: int, evaluate: Callable[[Candidate], Measurement],
                   trial_log: TrialLog, target: Measurement, limits: Limits, alphas: list[float]) -> None:
    """``trials`` distinct candidates chosen by Optuna's seeded TPE sampler over the grid's values;
    candidates already in the log are told to the study first (a rerun continues)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scales = sorted({c.scale for c in candidates})
    top_ks = sorted({c.top_k for c in candidates})
    distributions = {"scale": CategoricalDistribution(scales), "top_k": CategoricalDistribution(top_ks),
                     "alpha": CategoricalDistribution(sorted(set(alphas)))}
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    done: set[str] = set()
    for candidate in candidates:
        m = trial_log.get("tune", candidate)
        if m is not None and len(done) < trials:
            evaluate(candidate)  # from the log: no model work
            study.add_trial(optuna.trial.create_trial(params=candidate.as_dict(), distributions=distributions,
                                                      value=_objective(m, target, limits)))
            done.add(candidate.key)
    asks = 0
    while len(done) < trials and asks < 20 * trials:
        asks += 1
        trial = study.ask(distributions)
        candidate = Candidate(top_k=trial.params["top_k"], scale=trial.params["scale"], alpha=trial.params["alpha"])
        if candidate.key in done:
            m = trial_log.get("tune", candidate)
        else:
            m = evaluate(candidate)
            done.add(candidate.key)
        study.tell(trial, _objective(m, target, limits))


def _yardstick(heldout: dict[str, Measurement], limits: Limits) -> str:
    """With the base measured: where the broken-answer bound sits against theta_b's own rate."""
    base, target = heldout.get(BASE_ROW), heldout.get("target (unchanged)")
    if base is None or target is None:
        return ""
    bound = target.broken + limits.max_broken_increase
    gap = 100 * (bound - base.broken)
    where = (f"{gap:.1f} points above it" if gap > 0.05 else f"{-gap:.1f} points below it" if gap < -0.05
             else "at it")
    return (f"\n\nYardstick: the base theta_b breaks {100 * base.broken:.1f}% of these answers and opens "
            f"{100 * base.openings:.1f}% of its harmful-prompt answers by agreeing. The broken bound, the target's "
            f"{100 * target.broken:.1f}% + {100 * limits.max_broken_increase:g} points = {100 * bound:.1f}%, is {where}: "
            "a bound near or below the base's own rate asks for more than undoing the fine-tune gives.")


def _chosen_broken(result: TuneResult) -> str:
    """The chosen candidate's broken held-out answers, listed (see :func:`report.broken_examples`)."""
    from ckptops.tune import report

    if result.chosen is None:
        return ""
    chosen = result.heldout.get(f"chosen: {result.chosen.label()}")
    text = report.broken_examples(chosen, result.heldout.get(BASE_ROW)) if chosen is not None else ""
    return "\n\n" + text if text else ""


def _write_report(result: TuneResult, split: PromptSplit, limits: Limits, out: Path, *, models: dict[str, str],
                  scope: str, exclude: list[str], icv_rule: str, icv_demos, write_best, session: TuneSession) -> None:
    from ckptops.tune import report
    from ckptops.tune.choose import __doc__ as rule_doc

    front = {t.candidate.key for t in pareto_front(result.trials)}
    table = report.pareto_table(result.trials, result.target, front, limits, result.chosen)
    held = report.heldout_table(list(result.heldout.items()), result.heldout.get("target (unchanged)", result.target))
    verdict = (f"Chosen: **{result.chosen.label()}**." if result.chosen is not None else
               "**No candidate met the damage bounds; nothing was chosen.**"
               + (f" The least damaging was {result.least_damaging.label()}." if result.least_damaging else ""))
    bounds = (f"bounds: broken <= target's + {100 * limits.max_broken_increase:g} points, KL <= {limits.max_kl:g}"
              + (f", perplexity <= target's x {1 + limits.max_ppl_increase:g}" if limits.max_ppl_increase is not None else ""))
    sizes = split.describe()
    report.write_atomic(out / "pareto.md", (
        "# ckptops tune: every candidate on the tuning prompts\n\n"
        f"Tuning prompts: {sizes['tune']['harmful']} harmful, {sizes['tune']['benign']} benign; {bounds}. "
        "Rates in %; KL = KL(target || candidate) of the first answer token on the benign prompts, in nats. "
        "Best first by the choice rule.\n\n" + table + "\n\n" + verdict + "\n"))
    report.write_atomic(out / "heldout.md", (
        "# ckptops tune: held-out figures\n\n"
        f"Held-out prompts (never seen by the search): {sizes['heldout']['harmful']} harmful, "
        f"{sizes['heldout']['benign']} benign. Rates in % with 95% Wilson intervals; compliance openings = "
        "harmful-prompt answers that open by agreeing (\"Sure, here is ...\"); broken = empty or looping.\n\n"
        + held + "\n\n" + verdict + _yardstick(result.heldout, limits) + _chosen_broken(result) + "\n"))
    report.write_json(out / "pareto.json", {
        "format": REPORT_FORMAT,
        "target": result.target.as_dict(),
        "trials": [{"candidate": t.candidate.as_dict(), "label": t.candidate.label(), "pareto": t.candidate.key in front,
                    "violations": violations(t, result.target, limits), **t.measurement.as_dict()}
                   for t in result.trials],
    })
    report.write_json(out / "report.json", {
        "format": REPORT_FORMAT,
        "rule": " ".join(rule_doc.split("**Rule.**")[1].split("**Pareto front.**")[0].split()),
        "limits": {"max_broken_increase": limits.max_broken_increase, "max_kl": limits.max_kl,
                   "max_ppl_increase": limits.max_ppl_increase},
        "split": sizes,
        "chosen": result.chosen.as_dict() if result.chosen else None,
        "least_damaging": result.least_damaging.as_dict() if result.least_damaging else None,
        "heldout": {name: {**m.as_dict(), "intervals": m.intervals()} for name, m in result.heldout.items()},
        "seconds_model_work": {k: round(v, 3) for k, v in session.seconds.items()},
    })
    recipe_path = out / "recipe.toml"
    if result.chosen is not None:
        report.write_atomic(recipe_path, report.recipe_for(
            result.chosen, models, scope=scope, exclude=exclude, icv_rule=icv_rule,
            icv_demos=str(Path(icv_demos).resolve()) if icv_demos else None,
            out=str(write_best) if write_best else "tuned-model"))
    elif recipe_path.exists():
        recipe_path.unlink()
