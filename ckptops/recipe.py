"""TOML recipes: one file per Safety Arithmetic setup, validated whole before any work, then run
as HDR -> ICV computed on the HDR output -> ICV file placed in the output folder -> optional push.

A recipe names the three models (with revisions), the HDR parameters, the ICV parameters and the
output. ``--set section.key=value`` overrides any field. The resolved recipe is written into the
output folder as ``recipe.toml``, so ``ckptops run OUT/recipe.toml`` repeats the run exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from dataclasses import replace, dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ckptops.errors import CkptopsError, OutputError, RecipeError, UsageError

# section -> key -> (expected python types, default, required)
_NUM = (int, float)
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any, bool]]] = {
    "models": {
        "base": ((str,), None, True),
        "harmful": ((str,), "", False),  # required unless [harm] make = true
        "target": ((str,), None, True),
    },
    "hdr": {
        "top_k": (_NUM, 0.10, False),
        "scale": (_NUM, 3.0, False),
        "scope": ((str,), "global", False),
        "exclude": ((list,), [], False),
        "layers": ((str,), "", False),
        "edit_area": ((str,), "", False),
        "dtype": ((str,), "auto", False),
        "max_memory": ((str,), "1GiB", False),
        "shard_size": ((str,), "", False),
    },
    # [harm] make = true: build theta_H as a LoRA adapter (ckptops harm make) instead of naming one
    "harm": {
        "make": ((bool,), False, False),
        "out": ((str,), "", False),
        "questions": ((str,), "", False),
        "rank": ((int,), 16, False),
        "steps": ((int,), 100, False),
        "lr": (_NUM, 1e-3, False),
        "batch_size": ((int,), 8, False),
        "seed": ((int,), 0, False),
        "device": ((str,), "cpu", False),
        "dtype": ((str,), "float32", False),
    },
    "icv": {
        "enabled": ((bool,), True, False),
        "demos": ((str,), "", False),
        "positions": ((str,), "last4", False),
        "method": ((str,), "pc1+mean", False),
        "alpha": (_NUM, 0.12, False),
        "rule": ((str,), "official", False),
        "layers": ((str,), "", False),
        "max_memory": ((str,), "", False),
    },
    "output": {
        "out": ((str,), None, True),
        "push_to_hub": ((str,), "", False),
        "private": ((bool,), False, False),
        "overwrite": ((bool,), False, False),
    },
}
_CHOICES = {
    ("hdr", "scope"): ("global", "layer", "tensor"),
    ("hdr", "edit_area"): ("", "auto"),
    ("hdr", "dtype"): ("auto", "bfloat16", "float16", "float32"),
    ("harm", "dtype"): ("float32", "bfloat16"),
    ("icv", "positions"): ("last4", "last"),
    ("icv", "method"): ("pc1+mean", "pc1"),
    ("icv", "rule"): ("official", "paper", "additive"),
}


@dataclass
class Recipe:
    """A validated recipe: every section and key present, with defaults filled in."""

    data: dict[str, dict[str, Any]]
    source: str = "<recipe>"

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.data[section]

    def to_toml(self) -> str:
        return dump_toml(self.data, self.source)


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (numbers, booleans, quoted strings, lists),
    else the raw text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``section.key=value`` overrides to a raw recipe dict (a copy is returned)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. hdr.scale=2.5")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise RecipeError(f"--set {item!r}: the key must be section.key, e.g. hdr.scale")
        section, key = parts
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise RecipeError(f"--set {item!r}: [{section}] is not a table")
        data[section][key] = _parse_value(value.strip())
    return data


def validate(data: dict, source: str = "<recipe>") -> Recipe:
    """Check sections, keys, types and choices; fill defaults. Errors name the key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a TOML table")
    for section in data:
        if section not in SCHEMA:
            raise RecipeError(f"{source}: unknown section [{section}] (known: {', '.join(SCHEMA)})")
    result: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            raise RecipeError(f"{source}: [{section}] must be a table")
        for key in given:
            if key not in keys:
                raise RecipeError(f"{source}: unknown key {section}.{key} (known: {', '.join(keys)})")
        out: dict[str, Any] = {}
        for key, (types, default, required) in keys.items():
            if key not in given:
                if required:
                    raise RecipeError(f"{source}: {section}.{key} is required")
                out[key] = json.loads(json.dumps(default))
                continue
            value = given[key]
            if isinstance(value, bool) and bool not in types:
                raise RecipeError(f"{source}: {section}.{key} must be {_type_name(types)}, got a boolean")
            if not isinstance(value, types):
                raise RecipeError(f"{source}: {section}.{key} must be {_type_name(types)}, got {type(value).__name__} {value!r}")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise RecipeError(f"{source}: {section}.{key} must be a list of strings")
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{source}: {section}.{key} must be finite, got {value}")
            if isinstance(value, str) and required and not value.strip():
                raise RecipeError(f"{source}: {section}.{key} is empty")
            choices = _CHOICES.get((section, key))
            if choices and value not in choices:
                raise RecipeError(f"{source}: {section}.{key} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
            out[key] = value
        result[section] = out
    hdr = result["hdr"]
    if not 0 < hdr["top_k"] <= 1:
        raise RecipeError(f"{source}: hdr.top_k must be a fraction in (0, 1], got {hdr['top_k']}")
    if result["harm"]["make"] and result["models"]["harmful"]:
        raise RecipeError(f"{source}: give models.harmful or [harm] make = true, not both")
    if not result["harm"]["make"] and not result["models"]["harmful"].strip():
        raise RecipeError(f"{source}: models.harmful is required (or set [harm] make = true to build one)")
    if hdr["layers"] and hdr["edit_area"]:
        raise RecipeError(f"{source}: set hdr.layers or hdr.edit_area, not both")
    if hdr["layers"]:
        from ckptops.hdr.layers import parse_layers

        try:
            parse_layers(hdr["layers"])  # bounded before any work (a typo like 0-100000000)
        except CkptopsError as exc:
            raise RecipeError(f"{source}: hdr.layers: {str(exc).removeprefix('--layers: ')}") from None
    icv = result.get("icv", {})
    if "alpha" in icv and icv["alpha"] is not None:
        alpha = icv["alpha"]
        if alpha < 0 or not math.isfinite(alpha * 0.1):
            raise RecipeError(f"{source}: icv.alpha must be a finite number >= 0 (the default is 0.12), got {alpha!r}")
    return Recipe(result, source)


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


#: a recipe is a few dozen lines; anything this large is not one
MAX_RECIPE_BYTES = 1024 * 1024


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    from ckptops.safeio import read_text, unprintable

    path = Path(path)
    # a regular file (not /dev/zero or a FIFO) of recipe size, strict UTF-8
    text = read_text(path, MAX_RECIPE_BYTES, RecipeError, "recipe file")
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise RecipeError(f"{path}: TOML nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({' '.join(str(exc).split())})") from None
    if unprintable(data):
        raise RecipeError(f"{path}: holds text that is not valid Unicode")
    return validate(apply_overrides(data, overrides), str(path))


#: TOML's short escapes; every other control character is written as \uXXXX
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str, where: str = "<recipe>") -> str:
    """``text`` as a TOML basic string that parses back to exactly ``text``.

    Not ``json.dumps``: JSON escapes characters outside the BMP (an emoji in a path) as surrogate
    pairs, which TOML forbids, so the recipe written into OUT could not be run again. Everything
    except ``"``, ``\\`` and control characters (U+0000-U+001F, U+007F) is written as itself."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: undecodable bytes in a path
        raise RecipeError(f"{where} holds text that is not valid Unicode (undecodable bytes in a path?), "
                          "which a TOML recipe cannot hold; rename the file or folder") from None
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def dump_toml(data: dict[str, dict[str, Any]], source: str = "<recipe>") -> str:
    """Write a two-level recipe dict as TOML (strings, numbers, booleans, lists of strings);
    ``source`` names the recipe in errors."""
    def value(v: Any, where: str) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x, where) for x in v) + "]"
        if isinstance(v, str):
            return toml_string(v, where)
        raise TypeError(f"{where}: a recipe holds no {type(v).__name__} values")

    lines: list[str] = []
    for section, items in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v, f'{source}: {section}.{key}')}" for key, v in items.items()]
        lines.append("")
    return "\n".join(lines)


#: the flag each shared option check names, and the recipe key that sets that option
_RECIPE_KEYS = {"--top-k": "hdr.top_k", "--scale": "hdr.scale", "--scope": "hdr.scope", "--exclude": "hdr.exclude",
                "--layers": "hdr.layers", "--edit-area": "hdr.edit_area", "--dtype": "hdr.dtype",
                "--max-memory": "hdr.max_memory", "--shard-size": "hdr.shard_size"}


#: the same for the checks of ``harm make`` (its --dtype and --out are [harm]'s, not [hdr]'s)
_HARM_KEYS = {"--rank": "harm.rank", "--steps": "harm.steps", "--lr": "harm.lr", "--batch-size": "harm.batch_size",
              "--device": "harm.device", "--dtype": "harm.dtype", "--out": "harm.out"}


@contextmanager
def in_recipe_terms(source: str, keys: dict[str, str] | None = None):
    """The option checks are shared with the command line and name their flag (``--scale -3 is
    negative``); from a recipe the user needs the file and the key to edit, so say those."""
    try:
        yield
    except (UsageError, OutputError) as exc:
        text = str(exc)
        flag = re.match(r"--[a-z-]+", text)
        key = (keys or _RECIPE_KEYS).get(flag.group()) if flag else None
        if key is None:
            raise
        raise RecipeError(f"{source}: {key}{text[flag.end():]}") from None


def check_hdr_settings(recipe: Recipe, force: bool = False) -> None:
    """The ``[hdr]`` values the engine would refuse (sizes, exclude patterns, a negative scale),
    before any model is opened: ``run --check`` reports them too."""
    from ckptops.hdr.checks import check_sign
    from ckptops.hdr.options import SanitizeOptions
    from ckptops.hdr.plan import compile_excludes

    hdr = recipe["hdr"]
    with in_recipe_terms(recipe.source):
        SanitizeOptions.from_recipe(hdr, progress=False, force=force)
        compile_excludes(hdr["exclude"])
        check_sign(hdr["scale"], force)


def check_icv_settings(recipe: Recipe) -> None:
    """The ``[icv]`` values the ICV step would refuse only after the whole HDR: sizes, layer
    specs and the demonstrations file, named by key (``run --check`` reports them too)."""
    from ckptops.hdr.layers import parse_layers
    from ckptops.units import parse_size

    icv, source = recipe["icv"], recipe.source
    if not icv["enabled"]:
        return
    try:
        if icv["max_memory"]:
            parse_size(icv["max_memory"], "icv.max_memory")  # (refuses 0 and negative sizes too)
        if icv["layers"]:
            parse_layers(icv["layers"])
    except CkptopsError as exc:
        text = str(exc).removeprefix("--layers: ")
        raise RecipeError(f"{source}: {text if text.startswith('icv.') else 'icv.layers: ' + text}") from None
    if icv["demos"] and not Path(icv["demos"]).expanduser().is_file():
        raise RecipeError(f"{source}: icv.demos = {icv['demos']!r}: no such file")


def check_harm_settings(recipe: Recipe) -> None:
    """With ``[harm] make``: the values ``harm make`` refuses before training, named by key."""
    harm, source = recipe["harm"], recipe.source
    if not harm["make"]:
        return
    from ckptops.harm.make import check_settings

    with in_recipe_terms(source, _HARM_KEYS):
        check_settings(harm["rank"], None, harm["steps"], harm["lr"], harm["batch_size"], 0.0, harm["device"],
                       harm["dtype"])
    if harm["questions"] and not Path(harm["questions"]).expanduser().is_file():
        raise RecipeError(f"{source}: harm.questions = {harm['questions']!r}: no such file")


def check_output(recipe: Recipe) -> Path:
    """``output.out``: not an input, not holding one, new unless ``output.overwrite`` (named by
    key; ``run --check`` reports it too). Returns it."""
    from ckptops.checkpoint.publish import check_destination

    models, output = recipe["models"], recipe["output"]
    destination = Path(output["out"]).expanduser()
    roots = [Path(models[r]) for r in ("base", "harmful", "target") if models[r] and Path(models[r]).exists()]
    with in_recipe_terms(recipe.source, {"--out": "output.out"}):
        check_destination(destination, roots, output["overwrite"])
    return destination


def check_recipe(recipe: Recipe, force: bool = False) -> Path:
    """Everything the run would refuse before its work, named by recipe key: what ``run --check``
    reports and what ``run`` checks first. Returns the output folder."""
    check_hdr_settings(recipe, force)
    check_icv_settings(recipe)
    check_harm_settings(recipe)
    check_models_exist(recipe)
    return check_output(recipe)


def check_models_exist(recipe: Recipe) -> None:
    """Missing local models are reported before any work (Hub refs are checked when resolved)."""
    from ckptops.hub.refs import parse_hub_ref

    from ckptops.checkpoint.lora import split_base_plus_adapter
    from ckptops.checkpoint.resolve import looks_local

    for role in ("base", "harmful", "target"):
        ref = recipe["models"][role]
        if role == "harmful" and recipe["harm"]["make"]:
            continue
        parts = split_base_plus_adapter(ref) if role == "target" else None
        for part in parts or (ref,):  # BASE+ADAPTER: each part a local folder or a Hub id
            if not Path(part).expanduser().exists() and (parse_hub_ref(part) is None or looks_local(part)):
                named = f"{ref!r}" if parts is None else f"{ref!r}: {part!r}"
                raise RecipeError(f"{recipe.source}: models.{role} = {named}: no such folder "
                                  "(a Hub model is org/name, and its org is not a local folder)")


def run_recipe(recipe: Recipe, *, out: str | None = None, progress: bool | None = None,
               force: bool = False) -> dict:
    """HDR, then the ICV on the HDR output, then the card and recipe; move into place; push.

    Returns a summary dict (``sanitize`` report, ``icv`` metadata, ``out``, ``pushed``).
    """
    from ckptops.checkpoint.publish import move_into_place
    from ckptops.hdr.sanitize import SanitizeOptions, sanitize

    data = json.loads(json.dumps(recipe.data))
    stored = recipe  # recorded in OUT (recipe.toml, ckptops.json) as written, not with --out: a
    # rerun `ckptops run OUT/recipe.toml --out AGAIN` then writes the same bytes in every file
    if out:
        data["output"]["out"] = out
    recipe = validate(data, recipe.source)
    destination = check_recipe(recipe, force)
    # serialised before any work: a value TOML cannot hold (undecodable bytes in a path) is
    # refused now, not after minutes of sanitizing
    recipe_text = ("# resolved by ckptops; local paths are read from the folder the run started in: from there,\n"
                   "# run again with: ckptops run OUT/recipe.toml --out NEW_FOLDER\n" + stored.to_toml())
    models, hdr, icv, output = recipe["models"], recipe["hdr"], recipe["icv"], recipe["output"]
    if not models["harmful"]:  # harm make trains for minutes first: check what sanitize would refuse now
        from ckptops.checkpoint.lora import open_model
        from ckptops.checkpoint.side_files import check_side_files

        check_side_files(open_model(models["target"]))
    harmful = models["harmful"] or _harm_adapter(recipe, destination, progress)
    work = destination.absolute().parent / f".{destination.name}.recipe-{uuid.uuid4().hex[:8]}"
    try:
        # the title names the recipe's output, never the temporary work folder
        options = SanitizeOptions.from_recipe(hdr, progress=progress, force=force,
                                              title=Path(stored["output"]["out"] or destination.name).name)
        with in_recipe_terms(recipe.source):  # e.g. hdr.layers beyond the model's layers
            report = sanitize(models["base"], harmful, models["target"], work, options=options)
        report.out = str(destination)  # what the user gets ("wrote ..."), not the work folder
        summary: dict[str, Any] = {"sanitize": report.to_dict(), "icv": None, "out": str(destination), "pushed": None}
        if icv["enabled"]:
            icv_layers = icv["layers"] or (report.parameters.get("layers") if report.parameters.get("layers") != "all" else "")
            summary["icv"] = _compute_icv_into(work, icv, icv_layers, progress)
        (work / "recipe.toml").write_text(recipe_text, encoding="utf-8")
        _record_in_card(work, summary["icv"], stored)
        move_into_place(work, destination, output["overwrite"])
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if output["push_to_hub"]:
        summary["pushed"] = _push(destination, output["push_to_hub"], output["private"])
    return summary


def harm_adapter_folder(recipe: Recipe, destination: Path) -> Path:
    """Where ``[harm] make`` puts the adapter: ``harm.out``, else beside the output folder (never
    inside it, so that it is not published with the sanitized model)."""
    out = recipe["harm"]["out"]
    return Path(out).expanduser() if out else destination.absolute().parent / f"{destination.name}.harm-adapter"


def _harm_adapter(recipe: Recipe, destination: Path, progress: bool | None) -> str:
    """Build theta_H with ``harm make`` (or reuse the folder when it was made with the same
    parameters); returns its path."""
    from ckptops.harm.make import make_harm_adapter

    harm, base = recipe["harm"], recipe["models"]["base"]
    folder = harm_adapter_folder(recipe, destination)
    wanted = {"base": base, "rank": harm["rank"], "steps": harm["steps"], "lr": harm["lr"],
              "batch_size": harm["batch_size"], "seed": harm["seed"],
              "questions": harm["questions"] or "ckptops default"}
    record_path = folder / "ckptops-harm.json"
    if record_path.is_file():
        made = json.loads(record_path.read_text(encoding="utf-8")).get("parameters", {})
        if all(made.get(k) == v for k, v in wanted.items()):
            return str(folder)
        if not recipe["output"]["overwrite"]:
            raise RecipeError(f"{folder}: holds a harm adapter made with other parameters (set output.overwrite "
                              "= true to replace it, or harm.out to put the new one elsewhere)")
    with in_recipe_terms(recipe.source, _HARM_KEYS):
        make_harm_adapter(base, folder, questions=harm["questions"] or None, rank=harm["rank"], steps=harm["steps"],
                          lr=harm["lr"], batch_size=harm["batch_size"], seed=harm["seed"], device=harm["device"],
                          dtype=harm["dtype"], overwrite=True, progress=progress)
    return str(folder)


def _compute_icv_into(folder: Path, icv: dict, layers: str, progress: bool | None) -> dict:
    """Compute the ICV on the sanitized model in ``folder`` and save ``folder/icv.safetensors``."""
    from ckptops.hdr.layers import parse_layers
    from ckptops.icv.compute import compute_icv
    from ckptops.icv.demos import load_demos
    from ckptops.icv.load import load_model

    pairs = load_demos(icv["demos"] or None)
    chosen = parse_layers(layers) if layers else None
    with load_model(folder, max_memory=icv["max_memory"] or None, quiet=progress is False) as loaded:
        vector = compute_icv(loaded.model, loaded.tokenizer, pairs, positions=icv["positions"],
                             method=icv["method"], layers=None if chosen is None else sorted(chosen),
                             rule=icv["rule"], alpha=icv["alpha"], progress=progress,
                             source=loaded.source, source_sha256=loaded.source_sha256)
    # computed on the model in this folder: say so, not the temporary path it had while building
    vector = replace(vector, source=".")
    from ckptops.icv.file import check_strength

    check_strength(vector, "icv.alpha")  # never write an ICV whose strength turns logits into NaN
    vector.save(folder / "icv.safetensors", overwrite=True)
    return {"rule": vector.rule, "alpha": vector.alpha, "strength": vector.strength, "method": vector.method,
            "positions": vector.positions, "layers": vector.layers, "num_demos": vector.num_demos,
            "demos_sha256": vector.demos_sha256}


def _record_in_card(folder: Path, icv_meta: dict | None, recipe: Recipe) -> None:
    provenance_path = folder / "ckptops.json"
    provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
    provenance["recipe"] = recipe.data
    if icv_meta is not None:
        provenance["icv"] = icv_meta
    provenance_path.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    if icv_meta is not None:
        with open(folder / "README.md", "a", encoding="utf-8") as card:
            card.write(
                "\n## Safe-Align in-context vector\n\n"
                "`icv.safetensors` holds the safety in-context vector computed on this sanitized model "
                f"(rule `{icv_meta.get('rule', '?')}`, alpha `{icv_meta.get('alpha', '?')}`, method "
                f"`{icv_meta.get('method', '?')}`, positions `{icv_meta.get('positions', '?')}`). Apply it at load time:\n\n"
                "```python\nimport ckptops\nmodel = ckptops.from_pretrained(\"path/to/this/folder\")\n```\n"
            )


def _push(folder: Path, repo: str, private: bool) -> Any:
    from ckptops.hub.push import push

    return push(folder, repo, private=private).to_dict()
