"""The configuration reference (``docs/configuration.md``), generated from ``ServerConfig``'s source:
every field with its type, default, environment variable and the comment that documents it, under
the section comments of ``service/config.py``. A test checks the committed page equals this output,
so the reference cannot drift from the code.

    .venv/bin/python -m service.config_doc > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
from pathlib import Path

__all__ = ["render"]

INTRO = """# Configuration

Options come from defaults < a TOML file (`--config`) < environment variables
(`SPKSERVE_<OPTION>`, e.g. `SPKSERVE_MAX_BATCH_SIZE=16`; lists comma-separated) < command-line
flags. The resolved configuration is logged once at start-up (tokens masked). Sizes are per
model unless said otherwise. Per-model options (`vad*`, `min_*_speech_seconds`,
`decision_scale`, `decision_threshold`, ...) can be set for one model in a TOML table
`[model_settings.<model>]`; a model's `model.json` may carry its own VAD options, which those
override. Invalid values and unknown keys of the file stop the server at start-up with one line naming the
option (exit status 2); an `SPKSERVE_*` variable that names no option is logged as a warning (and listed
under `warnings` by `spkserve serve --check`) with the option it most resembles.

This page is generated from `service/config.py` (`python -m service.config_doc`).
"""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if f.name == "model_repository":
            return "`models/repository` (the installed package's)"
    else:
        return ""
    if value == "" or value == [] or value == {}:
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`" + ", ".join(map(str, value)) + "`"
    return f"`{value}`"


def render() -> str:
    """The Markdown page."""
    from service.config import ServerConfig

    src = Path(__file__).with_name("config.py").read_text()
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "ServerConfig")
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    lines = [INTRO, "| option | type | default | environment | meaning |", "|---|---|---|---|---|"]
    prev_end = cls.body[0].end_lineno if cls.body else cls.lineno
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign):
            prev_end = node.end_lineno
            continue
        name = node.target.id
        above = []  # comment lines directly above (section headings and notes), nearest last
        line = node.lineno - 1
        while line > prev_end and line in comments:
            above.insert(0, comments[line])
            line -= 1
        inline = comments.get(node.lineno, "")
        if above and not inline:
            inline, above = above[-1], above[:-1]
        for note in above:
            lines.append(f"| **{note}** | | | | |")
        kind = ast.unparse(node.annotation)
        lines.append(f"| `{name}` | `{kind}` | {_default(fields[name])} | `SPKSERVE_{name.upper()}` | "
                     f"{inline.replace('|', '/')} |")
        prev_end = node.end_lineno
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
