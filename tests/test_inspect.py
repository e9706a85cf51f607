"""`ckptops inspect` lists what the headers say and validates them."""

from __future__ import annotations

import json

from click.testing import CliRunner
from safetensors import safe_open

from ckptops.cli import main


def test_inspect_lists_every_tensor(triple):
    paths, states = triple
    result = CliRunner().invoke(main, ["inspect", str(paths["target"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = {}
    for shard in paths["target"].glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                expected[name] = (t.get_dtype(), t.get_shape(), shard.name)
    assert {n: (v["dtype"], v["shape"], v["shard"]) for n, v in data["tensors"].items()} == expected
    assert data["parameters"] == sum(v.numel() for v in states["target"].values())
    text = CliRunner().invoke(main, ["inspect", str(paths["target"])]).stdout
    assert "3 shard(s)" in text and "model.layers.2.mlp.down_proj.weight" in text


def test_inspect_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "m.safetensors"
    bad.write_bytes((16).to_bytes(8, "little") + b'{"a": "not ok"} ')
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: ") and "m.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_does_not_import_torch(triple):
    """Reading and validating headers needs no torch, whose import alone takes over a second."""
    import subprocess
    import sys

    paths, _ = triple
    code = (
        "import sys\n"
        "from ckptops.cli import main\n"
        f"try:\n    main(['inspect', {str(paths['target'])!r}])\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().endswith("NO-TORCH"), result.stdout[-500:] + result.stderr[-500:]
