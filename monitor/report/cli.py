"""The command line: ``python -m monitor report`` and the ``activation-monitor`` console script.

Exit status: 0; 1 with ``--fail-on KINDS`` (comma-separated alert kinds, or ``all``) when an
alert of one of those kinds fired and had not recovered by the end of its run; 2 for bad usage,
a missing directory, a directory without monitor event files (the message names the path), or a
``--fail-on`` name that looks like a typo of a built-in kind. Notes about damaged files go to
stderr (and into the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from monitor.report.compare import Comparison, compare, comparison_json
from monitor.report.config import mark_differing
from monitor.report.finding import ReportError, find_runs
from monitor.report.html import render_page
from monitor.report.jsonout import report_json
from monitor.report.reading import read_run
from monitor.report.summary import BUILTIN_BY_NORM, BUILTIN_KINDS, RunReport, norm_kind, summarise
from monitor.report.terminal import SPARK, Style, render_comparison, render_run


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Report what the activation monitor saw in one or more runs, from its event files.",
        epilog="Exit status: 0; 1 when --fail-on matched an alert still active at the end of its run; "
        "2 for a missing directory or one without monitor event files.",
    )
    p.add_argument(
        "runs", nargs="*", metavar="RUN_DIR", help="a run directory, or a parent of many runs (searched recursively)"
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        default=None,
        help="two runs side by side per layer (matched by name), the differences that matter marked; "
        "each directory must hold one run",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the terminal report")
    p.add_argument(
        "--fail-on",
        metavar="KINDS",
        default=None,
        help="comma-separated alert kinds (" + ", ".join(BUILTIN_KINDS) + ", your detectors' names) or 'all': "
        "exit 1 when one of them fired and had not recovered by the end of its run",
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        default=None,
        help="also write the report as one self-contained web page (tables, images, plots; no script, "
        "no network) to FILE ('-': the page on stdout instead of the terminal report)",
    )
    p.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colours (auto: when stdout is a terminal)"
    )
    return p


def _fail_kinds(spec: str, err: TextIO) -> list[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    if not kinds:
        raise ReportError("--fail-on: expected alert kinds separated by commas, or 'all'")
    if "all" in kinds:
        return ["all"]
    out = []
    for k in kinds:
        builtin = BUILTIN_BY_NORM.get(norm_kind(k))
        prefixed = [b for b in BUILTIN_KINDS if b.startswith(k + "_")]
        close = difflib.get_close_matches(k, BUILTIN_KINDS, n=1, cutoff=0.75)
        if builtin is not None:
            out.append(builtin)
        elif prefixed:  # "vanishing" -> vanishing_gradient, "attention" -> both attention kinds
            out += [*prefixed, k]  # and a detector of your own of that very name, if there is one
            if len(prefixed) > 1:
                print(f"note: --fail-on {k!r} is taken as {', '.join(prefixed)} (and a detector {k!r} of your own)", file=err)
        elif close:  # a typo in a CI gate must not pass silently
            raise ReportError(f"--fail-on: {k!r} is not an alert kind; did you mean {close[0]!r}? (or 'all')")
        elif re.fullmatch(r"[A-Za-z_][\w.-]*", k):
            print(
                f"note: --fail-on {k!r} is not a built-in alert kind ({', '.join(BUILTIN_KINDS)}); "
                "taken as the name of a detector of your own",
                file=err,
            )
            out.append(k)
        else:
            raise ReportError(f"--fail-on: {k!r} is not an alert kind (built-in: {', '.join(BUILTIN_KINDS)}, or 'all')")
    return out


def main(argv: Sequence[str] | None = None, prog: str = "activation-monitor") -> int:
    """The command line; returns the exit status (0, 1 with --fail-on, 2 for bad input)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["report"] and not os.path.isdir("report"):
        args_in = args_in[1:]  # `activation-monitor report RUN_DIR` == `activation-monitor RUN_DIR`
    out, err = sys.stdout, sys.stderr
    try:
        args = _parser(prog).parse_args(args_in)
    except SystemExit as e:
        return int(e.code or 0)
    if bool(args.runs) == bool(args.compare):
        print(
            f"{prog}: error: give RUN_DIR ... or --compare RUN_A RUN_B" + (", not both" if args.runs else ""), file=err
        )
        return 2
    try:
        fail_on = _fail_kinds(args.fail_on, err) if args.fail_on is not None else None
        found = _find_pair(args.compare) if args.compare else find_runs(args.runs)
    except ReportError as e:
        print(f"{prog}: error: {e}", file=err)
        return 2
    reports = [summarise(d, files, read_run(files, images=args.html is not None)) for d, files in found]
    mark_differing(reports)
    comparison = compare(*reports) if args.compare else None
    notes = [n for r in reports for n in r.notes]
    for n in notes:
        print(f"note: {n}", file=err)
    failed = []
    if fail_on is not None:
        for r in reports:
            for layer, e in r.active:
                if fail_on == ["all"] or e.kind in fail_on:
                    failed.append({"run": r.run, "layer": layer, "kind": e.kind, "step": e.step})
    if args.html not in (None, "-"):
        try:
            _write(args.html, render_page(reports, comparison))
        except OSError as e:
            print(f"{prog}: error: --html {args.html}: {e.strerror or e}", file=err)
            return 2
    try:
        _print(args, reports, comparison, fail_on, failed, notes, out)
    except BrokenPipeError:  # `... | head`: the reader has gone; the exit status still counts
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    if failed:
        what = ", ".join(f"{f['kind']} in {f['layer']} since step {f['step']} ({f['run']})" for f in failed)
        print(f"{prog}: --fail-on {args.fail_on}: still active at the end: {what}", file=err)
        return 1
    return 0


def _find_pair(paths: Sequence[str]) -> list[tuple[str, list[str]]]:
    pair = []
    for path in paths:
        found = find_runs([path])
        if len(found) != 1:
            names = ", ".join(os.path.relpath(d, path) for d, _ in found[:4]) + (", ..." if len(found) > 4 else "")
            raise ReportError(f"{path}: {len(found)} runs under this directory ({names}); --compare takes one run each")
        pair += found
    return pair


def _write(path: str, text: str) -> None:
    """``text`` into ``path`` whole or not at all (a temporary file beside it, then renamed)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _print(
    args: argparse.Namespace,
    reports: list[RunReport],
    comparison: Comparison | None,
    fail_on: list[str] | None,
    failed: list[dict[str, Any]],
    notes: list[str],
    out: TextIO,
) -> None:
    if args.html == "-":
        out.write(render_page(reports, comparison))
    elif args.json:
        if comparison is not None:
            doc = {"version": 1, "compare": comparison_json(comparison), "fail_on": fail_on, "failed": failed}
            doc["notes"] = notes
        else:
            doc = report_json(reports, fail_on, failed, notes)
        json.dump(doc, out, indent=1, allow_nan=False)
        out.write("\n")
    else:
        tty = bool(getattr(out, "isatty", lambda: False)())
        colour = args.color == "always" or (args.color == "auto" and tty and not os.environ.get("NO_COLOR"))
        width = max(shutil.get_terminal_size((100, 24)).columns, 40)
        enc = getattr(out, "encoding", None) or "utf-8"
        try:
            (SPARK + "→…").encode(enc)
            unicode = True
        except (UnicodeEncodeError, LookupError):
            unicode = False
        style = Style(colour)
        if comparison is not None:
            text = render_comparison(comparison, width, style, unicode)
        else:
            text = "\n\n".join(render_run(r, width, style, unicode, tty) for r in reports)
        if not unicode:
            text = text.replace("…", "~")
        out.write(text + "\n")
    out.flush()
