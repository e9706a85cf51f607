"""Offline safety evaluation: does a model refuse harmful prompts, answer benign ones, stay fluent?

``ckptops eval`` (see :mod:`ckptops.commands.evaluate`) wraps :func:`ckptops.evaluate.run.evaluate`
and :func:`ckptops.evaluate.run.compare`. One module per job:

- :mod:`~ckptops.evaluate.prompts`    read labelled prompt files (JSON lines, CSV)
- :mod:`~ckptops.evaluate.generate`   batched greedy generation through transformers
- :mod:`~ckptops.evaluate.judge`      refusal / compliance / empty / degenerate verdicts
- :mod:`~ckptops.evaluate.stats`      Wilson and Newcombe 95% intervals
- :mod:`~ckptops.evaluate.perplexity` streamed, strided perplexity on a text file
- :mod:`~ckptops.evaluate.report`     terminal tables and the JSON report
- :mod:`~ckptops.evaluate.destination` where ``--out`` may write that report (never over an input)
- :mod:`~ckptops.evaluate.run`        the library functions tying these together

Nothing here imports transformers at import time.
"""
