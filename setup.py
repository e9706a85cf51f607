"""Build the optional fused-loop extension; everything else lives in pyproject.toml.

The extension is optional: without a C compiler the build goes on and ckptops uses its torch
code path (same results, slower). -ffp-contract=off keeps the float arithmetic exactly the
separate IEEE operations the torch path performs (no fused multiply-adds).
"""

import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(ext_modules=[Extension("ckptops.hdr._fused", ["ckptops/hdr/_fused.c"], extra_compile_args=FLAGS, optional=True)])
