"""The checkpoint engine works without the optional transformers/accelerate extra."""

from __future__ import annotations

import subprocess
import sys


def test_sanitize_runs_with_transformers_and_accelerate_unavailable(triple, tmp_path):
    paths, _ = triple
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['accelerate'] = None\n"
        "from click.testing import CliRunner\n"
        "from ckptops.cli import main\n"
        f"r = CliRunner().invoke(main, ['sanitize', '--base', {str(paths['base'])!r}, '--harmful', {str(paths['harmful'])!r},"
        f" '--target', {str(paths['target'])!r}, '--out', {str(tmp_path / 'out')!r}, '-q'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(main, ['icv', 'compute', '--model', 'x', '--out', 'y.safetensors'])\n"
        "assert r.exit_code != 0 and 'pip install -e' in r.output, r.output\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    assert (tmp_path / "out" / "model-00001-of-00003.safetensors").exists()
