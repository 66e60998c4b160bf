"""gpu-check's verdict on a pytest run, read from its JUnit XML: a skip is a failure unless allowed.

Every test in tests/gpu is required on a GPU machine: a test that skips because a package is
missing (torchao, Liger-Kernel) or a fixture is absent has checked nothing, and a PASS built on it
would be false. So the part FAILs on any skip whose reason does not start with one of
`ALLOWED_SKIPS`, each of which says why that skip is right on one GPU; the allowed ones are named
in the summary. Expected failures (pytest's xfail, reported as skips of type "pytest.xfail") count
as such, not as skips.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ALLOWED_SKIPS = {
    "needs two GPUs": "a one-GPU machine cannot run it",
    "no fast path on this machine": "this torch has no varlen_attn and no flash-attn: the buckets path "
                                    "reads cu_seqlens on the host by design",
}
"""Skip reason (its start) -> why that skip is right on a one-GPU machine."""
NO_CUDA = "needs a CUDA GPU"
"""The reason tests/conftest.py gives every GPU test on a machine without CUDA (smoke mode)."""


def read_junit(path: Path) -> list[dict[str, str]]:
    """Each test case: name, outcome (passed / failed / skipped / xfailed) and, for a skip, its reason."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name', '')}"
        outcome, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                reason = (child.get("message") or "").strip()
        cases.append({"name": name, "outcome": outcome, "reason": reason})
    return cases


def allowed(reason: str) -> str | None:
    """Why a skip with this reason is right, or None (a required test did not run)."""
    return next((why for start, why in ALLOWED_SKIPS.items() if reason.startswith(start)), None)


def suite_verdict(xml: Path, rc: int, *, smoke: bool = False) -> str:
    """PASS / FAIL / SKIP with counts and the reason of every skip, from pytest's exit status and XML."""
    if not xml.exists():
        return f"FAIL (exit {rc}, no JUnit report: the tests did not run; see the log)"
    cases = read_junit(xml)
    counts = Counter(c["outcome"] for c in cases)
    tally = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    skips = [c for c in cases if c["outcome"] == "skipped"]
    required = [c for c in skips if allowed(c["reason"]) is None]
    no_cuda = all(c["reason"].startswith(NO_CUDA) for c in required)
    if smoke and required and no_cuda and len(skips) == len(cases):
        return f"SKIP (no CUDA: {len(cases)} tests collected, all need a GPU)"
    if counts["failed"] or rc not in (0, 5) or required or not cases:
        by_reason: dict[str, list[str]] = {}
        for c in required:
            by_reason.setdefault(c["reason"], []).append(c["name"])
        why = [f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} "
               f"skipped: {reason}" for reason, names in by_reason.items()]
        missing = "; required tests did not run: " + "; ".join(why) if why else ""
        return f"FAIL ({tally or 'no tests'}{missing})"
    named = sorted({f"{c['reason']} ({allowed(c['reason'])})" for c in skips})
    return f"PASS ({tally}{'; skips allowed: ' + '; '.join(named) if named else ''})"
