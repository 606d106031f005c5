"""`python -m codegen [--check] [--schema DIR] [--out DIR]`.

Without --check, writes every generated file. With --check, renders into a temporary directory and
compares them with what is checked in; exits 1 (printing the fix command) when anything differs.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from .model import SchemaError, load
from .render import ROOT, render_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m codegen", description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the checked-in files are stale")
    ap.add_argument("--schema", type=Path, default=ROOT / "schema", help="schema directory")
    ap.add_argument("--out", type=Path, default=ROOT, help="root to write the generated files under")
    args = ap.parse_args(argv)
    try:
        model = load(args.schema)
    except SchemaError as exc:
        print(f"codegen: schema error: {exc}", file=sys.stderr)
        return 2
    rendered = render_all(model)
    if args.check:
        stale = []
        with tempfile.TemporaryDirectory(prefix="resonant-codegen-") as tmp:
            _write(rendered, Path(tmp), quiet=True)
            fresh = {target: (Path(tmp) / target).read_text(encoding="utf-8") for target in rendered}
        for target, text in fresh.items():
            path = args.out / target
            current = path.read_text(encoding="utf-8") if path.exists() else ""
            if current != text:
                stale.append(target)
                diff = difflib.unified_diff(current.splitlines(), text.splitlines(),
                                            f"{target} (checked in)", f"{target} (from schema)", lineterm="", n=1)
                print("\n".join(list(diff)[:20]), file=sys.stderr)
        if stale:
            print(f"codegen: {len(stale)} generated file(s) are stale: {', '.join(stale)}", file=sys.stderr)
            print("codegen: fix with: make codegen", file=sys.stderr)
            return 1
        print(f"codegen: {len(rendered)} generated files are up to date")
        return 0
    _write(rendered, args.out, quiet=False)
    return 0


def _write(rendered: dict[str, str], root: Path, quiet: bool) -> None:
    for target, text in rendered.items():
        path = root / target
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            if not quiet:
                print(f"codegen: wrote {target}")


if __name__ == "__main__":
    sys.exit(main())
