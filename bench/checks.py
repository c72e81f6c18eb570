"""One way for the client scripts to run and count their checks: `check(name, fn)` prints a
line per check, and `finish()` exits non-zero when any failed."""
import sys

FAILED = []


def check(name, fn):
    try:
        detail = fn()
        print(f"ok    {name}: {detail}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
        FAILED.append(name)
        print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:300]}")


def finish():
    if FAILED:
        sys.exit(f"{len(FAILED)} failed: {FAILED}")
