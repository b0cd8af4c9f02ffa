"""What Windows lacks (POSIX signals and user ids, fork, the resource and fcntl modules, /proc) is only
used behind a guard: a platform check, a feature check, or an exception handler close by."""

from __future__ import annotations

import re

from tests.conftest import ROOT

PACKAGES = ("chat_format", "convert", "runtime", "models", "demos", "tests")
POSIX_ONLY = re.compile(r"os\.(geteuid|getuid|fork|killpg|uname|setsid)\(|signal\.SIG(KILL|HUP|USR1|USR2|ALRM|CHLD)\b"
                        r"|^\s*(import|from) (resource|fcntl|pwd|grp|termios)\b|[\"']/proc/")
GUARDS = ("os.name", "sys.platform", "hasattr(", "getattr(", "is_file()", "skipif", "except OSError",
          "except ImportError", "platform.system")
WINDOW = 8  # lines before and after a use that may hold its guard


def unguarded(text: str) -> list[str]:
    """Lines of ``text`` that use a POSIX-only feature with no guard within WINDOW lines."""
    lines = text.splitlines()
    found = []
    for number, line in enumerate(lines):
        nearby = "\n".join(lines[max(number - WINDOW, 0):number + WINDOW + 1])
        if POSIX_ONLY.search(line) and not any(guard in nearby for guard in GUARDS):
            found.append(f"{number + 1}: {line.strip()}")
    return found


def test_the_check_finds_an_unguarded_use() -> None:
    assert unguarded("import os\n\nuid = os.geteuid()\n") == ["3: uid = os.geteuid()"]
    assert unguarded("import os\nif os.name != 'nt':\n    uid = os.geteuid()\n") == []


def test_posix_only_features_are_guarded() -> None:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in files
                 for line in unguarded(path.read_text(encoding="utf-8"))]
    assert not offenders, "\n".join(offenders)
