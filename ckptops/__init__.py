"""ckptops: Safety Arithmetic (Hazra et al., EMNLP 2024) on checkpoint files.

The public API is re-exported here lazily, so that ``import ckptops`` stays fast and the
checkpoint engine never imports transformers::

    import ckptops
    report = ckptops.sanitize(base="base/", harmful="harmful/", target="target/", out="safe/")
"""

from __future__ import annotations

from ckptops import _startup

_startup.guard()  # the CLI only (never a library user): Ctrl-C while starting up is one line
from ckptops._lazy import lazy_getattr  # noqa: E402

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "sanitize": "ckptops.hdr.sanitize",
    "SanitizeOptions": "ckptops.hdr.sanitize",
    "SanitizeReport": "ckptops.hdr.sanitize",
    "diagnose": "ckptops.hdr.diagnose",
    "DiagnoseReport": "ckptops.hdr.diagnose",
    "open_checkpoint": "ckptops.checkpoint.resolve",
    "Checkpoint": "ckptops.checkpoint.resolve",
    "compute_icv": "ckptops.icv.compute",
    "ICV": "ckptops.icv.file",
    "load_icv": "ckptops.icv.file",
    "apply_icv": "ckptops.icv.patch",
    "from_pretrained": "ckptops.icv.patch",
    "patch_transformers": "ckptops.icv.patch",
    "export_gguf": "ckptops.icv.gguf_export",
    "diff_checkpoints": "ckptops.hdr.diff",
    "load_recipe": "ckptops.recipe",
    "run_recipe": "ckptops.recipe",
    "CkptopsError": "ckptops.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr('ckptops', _EXPORTS)
