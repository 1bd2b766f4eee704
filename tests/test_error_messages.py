"""Errors at the API name parameters (`steps`, `backend=ort`), never a front end's flags; each front end
re-spells them: the command line as its flags, the app as its form's labels."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fastdm.errors import BadInput, parameters, spell

ROOT = Path(__file__).resolve().parents[1]
# front ends whose own command lines their messages may name
FRONT_ENDS = {"fastdm/cli.py", "fastdm/service/batch.py", "fastdm/service/app.py", "fastdm/bench/harness.py",
              "fastdm/comfy/install.py"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with each interpolated value as ``X`` (so that a mark such as
    `` `resume={folder}` `` reads as `` `resume=X` ``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
    return None


def _messages(path: Path) -> list[tuple[int, str]]:
    """Every string of a module but its docstrings: error messages, refusal reasons a function returns,
    hints built in variables, message constants."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
                and isinstance(node.body[0], ast.Expr):
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)  # the parts: read as the whole f-string
    return [(node.lineno, t) for node in ast.walk(tree) if id(node) not in skip and (t := _text(node)) is not None]


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
            unknown |= {p for p in parameters(text) if p not in flags and p != "X"}  # X: a name interpolated, `{name}`
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
    from fastdm.service.app import FORM_FIELDS, EditService

    assert spell("`steps=500` is above this server's limit of 200; lower it", FORM_FIELDS) == (
        "Steps 500 is above this server's limit of 200; lower it")
    # what the page shows: form labels for the marks, the output folder for its path
    assert EditService._friendly("`seed` must be an integer, got 0.5 (in /tmp/x/run1)", {"/tmp/x/run1": "the output folder"}) == (
        "Seed must be an integer, got 0.5 (in the output folder)")


@pytest.mark.parametrize("command", ["fastdm.service.batch", "fastdm.service.app"])
def test_other_commands_spell_api_errors_as_their_flags(command, tmp_path, capsys):
    """fastdm-batch and fastdm-app check --model through the API: their one line names their own flag."""
    import importlib

    main = importlib.import_module(command).main
    missing = tmp_path / "nowhere"
    if command.endswith("batch"):
        manifest = tmp_path / "m.jsonl"
        manifest.write_text('{"input": "x.gif", "source_prompt": "a", "target_prompt": "b"}\n')
        argv = [str(manifest), "--out", str(tmp_path / "out"), "--model", str(missing)]
    else:
        argv = ["--model", str(missing), "--out-dir", str(tmp_path / "out")]
    try:
        rc = main(argv)
    except SystemExit as e:  # (a command may exit through argparse)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--model" in err and "`" not in err, err
