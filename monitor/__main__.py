"""``python -m monitor report RUN_DIR [RUN_DIR ...]``: see :mod:`monitor.report` (its :mod:`~monitor.report.cli`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from monitor.report import main as report

        return report(argv[1:], prog="python -m monitor report")
    print(
        "usage: python -m monitor report RUN_DIR [RUN_DIR ...] [--json] [--html FILE] [--fail-on KINDS] [--color WHEN]\n"
        "       python -m monitor report --compare RUN_A RUN_B [...]\n"
        "       (python -m monitor report --help for details)",
        file=sys.stderr,
    )
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
