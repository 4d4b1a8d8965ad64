"""The config reference, generated from the dataclasses in ``dist_train/config.py``: every key with its type,
default, allowed range, whether a resumed run may change it, and its docstring (the string under the field).

``dist-train config --reference`` prints it; docs/config-reference.md is its output, and a test fails when
the two differ (regenerate: ``dist-train config --reference > docs/config-reference.md``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import yaml

from dist_train import config as C

HEADER = """# Config reference

Every key of a dist-train config, generated from `dist_train/config.py` (`dist-train config --reference`
prints this page; `dist-train config CONFIG` prints a config with every default filled in). Keys are
written as in YAML sections (`train: {lr: 1e-4}`) or as dotted overrides on the command line
(`train.lr=1e-4`). "On resume": whether a run resumed from a checkpoint may change the key (else the resume
is refused, naming it). A range is checked before anything runs; a value outside it is one line, exit 2.
"""


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right under its annotation in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _dataclass_of(tp) -> type | None:
    """The dataclass a field holds (also behind Optional), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _yaml(value) -> str:
    if dataclasses.is_dataclass(value):
        return "(section)"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _range(key: str) -> str:
    if key not in C.RANGES:
        return ""
    low, high, bounds = C.RANGES[key]
    return C._range_text(low, high, bounds) if (low is not None or high is not None) else "finite"


def entries(cls: type = C.Config, prefix: str = "", policies: dict | None = None) -> list[dict]:
    """One dict per key (dotted): type, default, range, on-resume policy, docstring."""
    policies = policies if policies is not None else C.resume_policies()
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        inner = _dataclass_of(tp)
        if inner is not None and dataclasses.is_dataclass(tp):
            out += entries(inner, f"{key}.", policies)
            continue
        policy = policies.get(key) or next((v for k, v in policies.items() if key.startswith(k + ".")), "")
        out.append({"key": key, "type": C._type_name(tp), "default": _yaml(_default(f)), "range": _range(key),
                    "on_resume": policy.replace("_", " "), "doc": docs.get(f.name, "")})
        if inner is not None:  # an optional section (model.lora): its keys, when it is given
            out += [{**e, "on_resume": policy.replace("_", " ")} for e in entries(inner, f"{key}.", {})]
    return out


def reference() -> str:
    lines = [HEADER]
    section = None
    for e in entries():
        top = e["key"].split(".")[0] if "." in e["key"] else "(top level)"
        if top != section:
            section = top
            lines.append(f"\n## {'`' + top + '`' if top != '(top level)' else 'Top level'}\n")
        facts = [f"type `{e['type']}`", f"default `{e['default']}`"]
        if e["range"]:
            facts.append(f"range {e['range']}")
        if e["on_resume"]:
            facts.append(f"on resume: {e['on_resume']}")
        lines.append(f"### `{e['key']}`\n\n{' · '.join(facts)}\n")
        if e["doc"]:
            lines.append(textwrap.fill(e["doc"], 110) + "\n")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
