"""Errors at the API name parameters (`steps`, `backend=ort`), never a front end's flags; each front end
re-spells them: the command line as its flags, the app as its form's labels."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fastdm.errors import BadInput, parameters, spell

ROOT = Path(__file__).resolve().parents[1]
ERRORS = {"FastDMError", "BadInput", "Unsupported", "MissingDependency", "Diverged", "ResumeMismatch"}
# front ends whose own command lines their messages may name
FRONT_ENDS = {"fastdm/cli.py", "fastdm/service/batch.py", "fastdm/service/app.py", "fastdm/bench/harness.py"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def _texts(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _messages(path: Path) -> list[tuple[int, str]]:
    out = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in ERRORS or (name == "append" and getattr(getattr(f, "value", None), "id", "") == "reasons"):
                out += [(node.lineno, t) for a in node.args for t in _texts(a)]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            out += [(node.lineno, t) for t in _texts(node.value) if "use " in t or "must" in t]  # message constants
    return out


def test_api_messages_name_no_flags():
    bad = []
    for path in sorted(ROOT.joinpath("fastdm").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in FRONT_ENDS:
            continue
        for line, text in _messages(path):
            text = text.replace("--local-dir", "")  # a shell command the message quotes, not a fastdm flag
            if FLAG.search(text):
                bad.append(f"{rel}:{line}: {text.strip()}")
    assert not bad, "messages naming command-line flags (mark the parameter as `name` or `name=value`):\n" + "\n".join(bad)


def test_spell_maps_marks_to_a_front_ends_names():
    flags = {"steps": "--steps", "backend": "--backend", "guidance_scale": "--guidance-scale"}
    msg = "`backend=ort` runs on cpu or cuda; use `backend=eager`; `steps` must be >= 1; `guidance_scale` and `window`"
    assert spell(msg, flags) == ("--backend ort runs on cpu or cuda; use --backend eager; --steps must be >= 1; "
                                 "--guidance-scale and `window`")
    assert parameters(msg) == ["backend", "backend", "steps", "guidance_scale", "window"]
    assert spell("no marks here", flags) == "no marks here"


def test_every_parameter_a_message_marks_is_a_parameter():
    """A mark names something a caller can set: a fastdm-edit option, an EditRequest or an EditConfig field."""
    import dataclasses

    from fastdm.cli import build_parser, flags_of
    from fastdm.driver.config import EditConfig
    from fastdm.request import EditRequest

    flags = {*flags_of(build_parser()), *(f.name for f in dataclasses.fields(EditRequest)),
             *(f.name for f in dataclasses.fields(EditConfig))}
    unknown = set()
    for path in sorted(ROOT.joinpath("fastdm").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in FRONT_ENDS:
            continue
        for _, text in _messages(path):
            unknown |= {p for p in parameters(text) if p not in flags}
    assert not unknown, f"marked names that are no parameter: {sorted(unknown)}"


def test_api_error_names_the_parameter_and_cli_names_the_flag(tmp_path, capsys):
    from fastdm import cli
    from fastdm.driver.config import EditConfig

    with pytest.raises(BadInput) as e:
        EditConfig(source_prompt="a", target_prompt="b", steps=0).validate()
    assert str(e.value).startswith("`steps` must be") and e.value.field == "steps" and e.value.code == "bad_input"
    clip = ROOT / "fastdm" / "assets" / "clips" / "red_circle_right.gif"
    out = tmp_path / "o.mp4"
    rc = cli.main([str(clip), "--source-prompt", "a", "--target-prompt", "b", "--steps", "0", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("fastdm-edit: error: --steps must be") and "`" not in err, err
    assert not out.exists()


def test_the_app_names_its_form_fields():
    from fastdm.service.app import FORM_FIELDS

    assert spell("`steps=500` is above this server's limit of 200; lower it", FORM_FIELDS) == (
        "Steps 500 is above this server's limit of 200; lower it")
