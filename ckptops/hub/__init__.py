"""The Hugging Face Hub edge of ckptops: read inputs from the Hub, publish outputs to it.

- :mod:`~ckptops.hub.refs`     recognise ``org/name[@revision]`` (no network code)
- :mod:`~ckptops.hub.resolve`  pin the revision to a commit, read every header by range requests
- :mod:`~ckptops.hub.headers`  the two range requests that read one safetensors header
- :mod:`~ckptops.hub.download` fetch a file through huggingface_hub's cache, evict it (``--low-disk``)
- :mod:`~ckptops.hub.push`     create the repo and upload an output folder with its model card
- :mod:`~ckptops.hub.explain`  huggingface_hub exceptions -> one-line :class:`~ckptops.errors.HubError`
- :mod:`~ckptops.hub.retry`    retry transient failures with backoff

Submodules import ``huggingface_hub``; this package itself does not, so that
``ckptops.checkpoint`` can check whether a reference is a repo id without loading network code.
Pushing: ``from ckptops.hub.push import push, plan_push`` (the module name ``push`` would shadow a
package-level function of the same name, so none is exported here).
"""

from __future__ import annotations

from ckptops._lazy import lazy_getattr

_EXPORTS = {
    "parse_hub_ref": "ckptops.hub.refs",
    "HubRef": "ckptops.hub.refs",
    "open_hub_checkpoint": "ckptops.hub.resolve",
    "HubCheckpoint": "ckptops.hub.resolve",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr('ckptops.hub', _EXPORTS)
