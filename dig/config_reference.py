"""Every configuration key, generated from the pydantic schemas (`dig config --list`; README.md includes the
output and tests/test_config_reference.py keeps the two equal).

A key's meaning is its Field description, else the comment at the end of its line in the schema's source.
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import tokenize
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _line_comments(cls: type) -> dict[str, str]:
    """field name -> the trailing `# comment` of its (last) source line in `cls`."""
    source = inspect.getsource(inspect.getmodule(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return {stmt.target.id: comments[stmt.end_lineno] for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and stmt.end_lineno in comments}
    return {}


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) for every leaf key of `model`, sections expanded in order."""
    comments = _line_comments(model)
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += rows(annotation, f"{prefix}{name}.")
            continue
        meaning = field.description or comments.get(name, "")
        out.append((f"{prefix}{name}", _type_name(annotation), _default(field), meaning.replace("|", "\\|")))
    return out


def table(model: type[BaseModel]) -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | {kind} | {default} | {meaning} |" for key, kind, default, meaning in rows(model)]
    return "\n".join(lines)


def reference() -> str:
    """The Markdown README includes between its `dig config --list` markers."""
    from data_pipeline.config import PipelineConfig
    from dig.train.config import TrainConfig

    return "\n".join([
        "Training (`dig train --config FILE key=value …`; schema `dig/train/config.py`):", "",
        table(TrainConfig), "",
        "Preprocessing (`python -m data_pipeline --config FILE --flag value …`; schema `data_pipeline/config.py`):",
        "", table(PipelineConfig)])


BEGIN = "<!-- dig config --list: begin -->"
END = "<!-- dig config --list: end -->"


def update_readme(path: str) -> bool:
    """Put the current reference between README's markers; True when the file changed.
    `python -m dig.config_reference README.md` after changing a schema."""
    with open(path) as f:
        text = f.read()
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{path}: markers {BEGIN!r} ... {END!r} not found")
    new = f"{head}{BEGIN}\n{reference()}\n{END}{tail}"
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    import sys

    for readme in sys.argv[1:] or ["README.md"]:
        print(f"{readme}: {'updated' if update_readme(readme) else 'already current'}")
