"""Safe-Align: the safety in-context vector (ICV) of Safety Arithmetic (Hazra et al.,
EMNLP 2024).

* :mod:`~ckptops.icv.demos` -- demonstration pairs (JSON lines) and the shipped default set
* :mod:`~ckptops.icv.compute` -- hidden states -> PCA -> per-layer vectors (:func:`compute_icv`)
* :mod:`~ckptops.icv.file` -- the ``icv.safetensors`` format (:class:`ICV`, :func:`load_icv`)
* :mod:`~ckptops.icv.patch` -- forward hooks that steer a model (:func:`apply_icv`,
  :func:`from_pretrained`, :func:`patch_transformers`)
* :mod:`~ckptops.icv.arch` -- where each architecture keeps its decoder layers and MLP blocks
* :mod:`~ckptops.icv.load` -- model loading, with ``max_memory`` disk offload for low RAM
* :mod:`~ckptops.icv.gguf_export` -- llama.cpp control-vector export

transformers, accelerate and gguf (the ``[icv]`` extra) are imported only when a function needs
them; without them, those functions raise :class:`ckptops.errors.MissingExtraError`.
"""

from __future__ import annotations

from ckptops._lazy import lazy_getattr

_EXPORTS = {
    "compute_icv": "ckptops.icv.compute",
    "ICV": "ckptops.icv.file",
    "load_icv": "ckptops.icv.file",
    "apply_icv": "ckptops.icv.patch",
    "ICVHandle": "ckptops.icv.patch",
    "icv_handle": "ckptops.icv.patch",
    "from_pretrained": "ckptops.icv.patch",
    "patch_transformers": "ckptops.icv.patch",
    "unpatch_transformers": "ckptops.icv.patch",
    "export_gguf": "ckptops.icv.gguf_export",
    "load_demos": "ckptops.icv.demos",
    "DemoPair": "ckptops.icv.demos",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr('ckptops.icv', _EXPORTS)
