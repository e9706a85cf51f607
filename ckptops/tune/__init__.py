"""``ckptops tune``: search HDR scale, top-k and ICV strength against measured behaviour.

Why: the right strength of Harm Direction Removal is not a closed-form number. A target that
moved only weakly along the harm vector is damaged by the shipped scale 3; one that moved
strongly needs it. ``tune`` applies every candidate to the target **in memory** (no checkpoint
per trial), judges it with the generation, judge and statistics of ``ckptops eval``, and picks
the candidate by a stated rule, reported on held-out prompts. One module per job:

- :mod:`~ckptops.tune.space`    the candidate grid, option parsing and checks
- :mod:`~ckptops.tune.prompts`  the prompt files, split into tuning and held-out parts by seed
- :mod:`~ckptops.tune.apply`    a candidate's HDR weights written into the loaded model, bit for
  bit what ``sanitize`` writes
- :mod:`~ckptops.tune.measure`  generation + judge + KL + perplexity of the model as it is now
- :mod:`~ckptops.tune.choose`   the Pareto front and the choice rule
- :mod:`~ckptops.tune.log`      the ``trials.jsonl`` log a rerun continues from
- :mod:`~ckptops.tune.report`   the output folder: tables, JSON, ``recipe.toml``
- :mod:`~ckptops.tune.run`      :func:`tune`, tying these together (grid or Optuna)

transformers is imported only when a model is loaded; optuna only with ``--trials``.
"""

from ckptops._lazy import lazy_getattr

_EXPORTS = {"tune": "ckptops.tune.run", "TuneSession": "ckptops.tune.run", "TuneResult": "ckptops.tune.run"}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("ckptops.tune", _EXPORTS)
