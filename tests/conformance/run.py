#!/usr/bin/env python3
"""RFC 6455 conformance of staps, judged by the Autobahn|Testsuite fuzzing client.

staps never sends a message back to its sender, so each case talks to a
channel of its own on which the mirror client (examples/mirror.rs) sends back
whatever it receives: the suite's messages cross staps twice, and what it
judges is staps' framing, UTF-8 validation, pings and close handshakes.

Usage (what `make conformance` runs):
    run.py --staps BIN --mirror BIN --wstest WSTEST [--cases 1.*,2.*] [--out DIR]

Exit status 0 when no case FAILED and every case that is not OK is listed in
ALLOWED below with the reason RFC 6455 allows it; 1 otherwise.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

DEFAULT_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]

# Cases whose result may be other than OK, and why that is allowed. Every other
# result than OK or one of these fails the run, so this list is the whole
# account of where staps departs from the strictest reading.
ALLOWED = {}

# A valid message followed at once by an invalid frame (reserved bits,
# reserved opcode, a continuation with nothing to continue). The suite expects
# the valid message's echo before the failure, as from an echo server that
# answers each frame before it reads the next. Here the echo travels through a
# second client (the mirror) and back, while staps reads the invalid frame
# right behind the message and fails the connection at once, as RFC 6455
# (5.2, 5.4) requires, so the echo arrives too late: NON-STRICT.
for case in ["3.2", "3.3", "3.4", "4.1.3", "4.1.4", "4.1.5", "4.2.3", "4.2.4", "4.2.5", "5.15"]:
    ALLOWED[case] = ("NON-STRICT", "echo through the mirror arrives after the connection failed")

# A text message in one frame, with invalid UTF-8, sent in several TCP chops.
# The suite would like the connection failed at the first invalid chop; staps
# (tungstenite) reads a frame whole before it validates its payload, so it
# fails when the frame is complete. RFC 6455 8.1 requires failing on invalid
# UTF-8, not failing before the frame ends. (Invalid UTF-8 in a later
# fragment, 6.4.1/6.4.2, is caught at that fragment: OK.)
for case in ["6.4.3", "6.4.4"]:
    ALLOWED[case] = ("NON-STRICT", "invalid UTF-8 detected when its frame is complete (RFC 6455 8.1)")

# What Autobahn gives a case that only reports (7.1.6, the 9.x timings).
REPORTING = {"INFORMATIONAL"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(proc, needle, deadline, what, seen):
    """Read proc's stdout until a line contains needle; keep lines in seen."""
    result = {}

    def reader():
        for line in proc.stdout:
            seen.append(line)
            if needle in line and "ok" not in result:
                result["ok"] = True
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if "ok" not in result:
        sys.exit(f"conformance: {what} did not start: {''.join(seen)[-2000:]}")
    # Keep draining so that the process never blocks on a full pipe.
    threading.Thread(target=lambda: [seen.append(l) for l in proc.stdout], daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--staps", required=True)
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--wstest", required=True)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--out", default=None, help="where Autobahn writes its reports")
    args = ap.parse_args()
    for name in ("staps", "mirror", "wstest"):
        setattr(args, name, os.path.abspath(getattr(args, name)))

    work = tempfile.mkdtemp(prefix="staps-conformance-")
    out = os.path.abspath(args.out or os.path.join(work, "reports"))
    port = free_port()
    conf = os.path.join(work, "staps.conf")
    with open(conf, "w") as f:
        f.write(
            "[staps]\n"
            f"listen = 127.0.0.1:{port}\n"
            "log_level = warn\n"
            "[limits]\n"
            # Case 9 sends messages of up to 16 MiB, and bursts of 1000.
            "max_message_size = 16777216\n"
            "queue_length = 4096\n"
        )
    cases = case_ids(args.wstest, [c.strip() for c in args.cases.split(",") if c.strip()])
    base = f"ws://127.0.0.1:{port}"
    procs = []
    staps_out, mirror_out = [], []
    try:
        staps = subprocess.Popen(
            [args.staps, "-c", conf, "-v"], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        procs.append(staps)
        wait_for_line(staps, "listening on", time.monotonic() + 30, "staps", staps_out)
        # A channel per case: an echo that comes back after its case has closed
        # its connection must not reach the next case's connection.
        mirror = subprocess.Popen(
            [args.mirror] + [f"{base}/{agent(c)}" for c in cases],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        procs.append(mirror)
        wait_for_line(mirror, "mirror: on", time.monotonic() + 60, "the mirror", mirror_out)

        spec = {
            "outdir": out,
            "servers": [{"agent": agent(c), "url": f"{base}/{agent(c)}"} for c in cases],
            "cases": cases,
            "exclude-cases": [],
            # Each agent (channel) runs its own case only. Autobahn turns these
            # patterns into regular expressions ('.' and '*' escaped), so a
            # negative lookahead written without dots says "every other case".
            "exclude-agent-cases": {
                agent(c): ["(?!" + c.replace(".", "[.]") + "$)*"] for c in cases
            },
        }
        spec_path = os.path.join(work, "fuzzingclient.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=2)
        started = time.monotonic()
        run = subprocess.run(
            [args.wstest, "-m", "fuzzingclient", "-s", spec_path], cwd=work,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        took = time.monotonic() - started
        if mirror.poll() is not None:
            print("".join(mirror_out)[-2000:])
            sys.exit("conformance: the mirror client left during the run")
        index = os.path.join(out, "index.json")
        if run.returncode != 0 or not os.path.exists(index):
            print(run.stdout[-4000:])
            sys.exit(f"conformance: wstest failed (exit {run.returncode})")
        with open(index) as f:
            by_agent = json.load(f)
        results = {c: by_agent[agent(c)][c] for c in cases if c in by_agent.get(agent(c), {})}
        left = [line for line in mirror_out if not line.startswith("mirror: on")]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    for line in left:
        print(f"  mirror: {line.rstrip()}")
    return judge(results, cases, took, out)


def agent(case):
    """The agent name and channel of one case: 'case-1-1-1'."""
    return "case-" + case.replace(".", "-")


def case_ids(wstest, patterns):
    """The case ids that `patterns` select, as Autobahn resolves them."""
    python = os.path.join(os.path.dirname(wstest), "python")
    code = (
        "import json, sys\n"
        "from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, "
        "CaseBasename, CaseSetname\n"
        "from autobahntestsuite.caseset import CaseSet\n"
        "cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)\n"
        "print(json.dumps(cs.parseSpecCases({'cases': json.loads(sys.argv[1])})))\n"
    )
    found = subprocess.run(
        [python, "-c", code, json.dumps(patterns)], stdout=subprocess.PIPE, text=True,
        check=True,
    )
    return json.loads(found.stdout.strip().splitlines()[-1])


def case_key(case):
    return tuple(int(x) for x in case.split("."))


def judge(results, cases, took, out):
    bad = []
    noted = []
    for case in sorted(results, key=case_key):
        r = results[case]
        behavior, close = r["behavior"], r["behaviorClose"]
        if {behavior, close} <= {"OK"} | REPORTING:
            continue
        allowed = ALLOWED.get(case)
        if allowed and allowed[0] in (behavior, close) and "FAILED" not in (behavior, close):
            noted.append((case, behavior, close, allowed[1]))
        else:
            bad.append((case, behavior, close, r.get("reportfile", "")))
    ran = len(results)
    missing = [c for c in cases if c not in results]
    by_result = {}
    for case, r in results.items():
        by_result[r["behavior"]] = by_result.get(r["behavior"], 0) + 1
    summary = ", ".join(f"{n} {b}" for b, n in sorted(by_result.items()))
    print(f"Autobahn|Testsuite against staps: {ran} cases in {took:.0f} s: {summary}")
    print(f"reports: {out}/index.html")
    for case, behavior, close, why in noted:
        print(f"  allowed  {case}: {behavior}/{close}: {why}")
    for case, behavior, close, report in bad:
        print(f"  FAILED   {case}: behavior {behavior}, close {close} ({report})")
    for case in missing:
        print(f"  MISSING  {case}: no result")
    if bad or missing or ran == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
