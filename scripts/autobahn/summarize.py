#!/usr/bin/env python3
"""Summarises Autobahn|Testsuite reports written by scripts/autobahn.sh.

usage: summarize.py OUT MODE...

Writes OUT/summary-<mode>.md per mode and prints them. Exit status 1 when
echo mode has a case not OK or INFORMATIONAL, or when proxy mode does
worse than the backend alone on any case (when both were run).
"""
import collections
import json
import os
import sys

RANK = {"OK": 0, "INFORMATIONAL": 0, "NON-STRICT": 1, "UNIMPLEMENTED": 2, "WRONG CODE": 3, "UNCLEAN": 3, "FAILED": 4}


def load(out, mode):
    path = os.path.join(out, mode, "reports", "index.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        idx = json.load(f)
    return next(iter(idx.values())) if idx else {}


def case_key(c):
    return [int(x) for x in c.split(".")]


def worst(r):
    return max(RANK.get(r["behavior"], 4), RANK.get(r["behaviorClose"], 4))


def summary(mode, res, baseline):
    counts = collections.Counter(r["behavior"] for r in res.values())
    close = collections.Counter(r["behaviorClose"] for r in res.values())
    lines = [f"# Autobahn|Testsuite: {mode}", ""]
    lines.append(f"{len(res)} cases. Behaviour: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines.append("Close behaviour: " + ", ".join(f"{k} {v}" for k, v in sorted(close.items())))
    comp = [c for c in res if c.split(".")[0] in ("12", "13")]
    if comp:
        ok = sum(1 for c in comp if worst(res[c]) == 0)
        lines.append(f"Compression (12.*, 13.*): {len(comp)} cases run, {ok} OK")
    lines.append("")
    bad = [c for c in sorted(res, key=case_key) if worst(res[c]) > 0]
    if bad:
        lines.append("| case | behaviour | close | remote close code | backend alone |")
        lines.append("|---|---|---|---|---|")
        for c in bad:
            r = res[c]
            b = baseline.get(c) if baseline else None
            bs = f"{b['behavior']}/{b['behaviorClose']}" if b else "-"
            lines.append(f"| {c} | {r['behavior']} | {r['behaviorClose']} | {r.get('remoteCloseCode')} | {bs} |")
    else:
        lines.append("Every case OK or INFORMATIONAL.")
    return "\n".join(lines) + "\n"


def main():
    out, modes = sys.argv[1], sys.argv[2:]
    backend = load(out, "backend")
    status = 0
    for mode in modes:
        res = load(out, mode)
        if res is None:
            print(f"{mode}: no report")
            status = 1
            continue
        text = summary(mode, res, backend if mode != "backend" else None)
        if mode == "echo":
            # The gateway is the endpoint here: every case OK or
            # INFORMATIONAL, compression included.
            failed = [c for c, r in res.items() if worst(r) > 0]
            if failed:
                status = 1
                text += "\nNot OK or INFORMATIONAL: " + ", ".join(sorted(failed, key=case_key)) + "\n"
        if mode in ("proxy", "haproxy") and backend:
            worse = [c for c, r in res.items() if c in backend and worst(r) > worst(backend[c])]
            text += "\nWorse than the backend alone: " + (", ".join(sorted(worse, key=case_key)) or "none") + "\n"
            if worse and mode == "proxy":
                status = 1
        with open(os.path.join(out, f"summary-{mode}.md"), "w") as f:
            f.write(text)
        print(text)
    sys.exit(status)


main()
