"""Runs a command and reports its wall time and peak memory, sampled from /proc (Linux).

usage: python3 bench/peak_memory.py [--json FILE] [--interval S] -- COMMAND ARGS...

Peak RSS is the kernel's high-water mark (VmHWM, read at every sample, so it is exact up to the
last sample before exit). RSS is anonymous memory (heap: the part that must fit in RAM) plus
file-backed pages (memory maps of the input, the output's data file and scratch files: page
cache the kernel can drop and read again), plus shared memory. The kernel keeps no high-water
mark per part, so the peaks of RssAnon and RssFile are the largest sampled values (every 0.1 s
by default).

At each new anonymous peak (64 MiB above the last one recorded) the five largest anonymous
mappings are read from /proc/PID/smaps, so that the result says what the peak is made of (one
large region, or many small ones); with --timeline, RssAnon and RssFile every few seconds.
"""
import argparse
import json
import os
import subprocess
import sys
import time

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def sample(pid):
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in FIELDS:
                    values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return values


def largest_anonymous_mappings(pid, count=5):
    """(anonymous bytes, mapping size, the mapping's smaps header) of the largest anonymous parts."""
    mappings, header, size = [], None, 0
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    header = line.strip()
                    start, end = (int(x, 16) for x in first.split("-"))
                    size = end - start
                elif first == "Anonymous:" and header:
                    anonymous = int(line.split()[1]) * 1024
                    if anonymous:
                        mappings.append((anonymous, size, header))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return sorted(mappings, reverse=True)[:count]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--timeline", type=float, default=0, help="seconds between timeline samples (0: none)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    started = time.monotonic()
    process = subprocess.Popen(command)
    peaks = dict.fromkeys(FIELDS, 0)
    anonymous_peak, recorded_at, timeline, next_sample = None, 0, [], 0.0
    while True:
        values = sample(process.pid)
        if values:
            for key, value in values.items():
                peaks[key] = max(peaks[key], value)
            now = time.monotonic() - started
            anon = values.get("RssAnon", 0)
            if anon > recorded_at + (64 << 20):
                mappings = largest_anonymous_mappings(process.pid)
                if mappings:
                    recorded_at = anon
                    anonymous_peak = {"seconds": round(now, 1), "rss_anon_bytes": anon,
                                      "largest": [{"anonymous_bytes": a, "mapping_bytes": s, "smaps": h}
                                                  for a, s, h in mappings]}
            if args.timeline and now >= next_sample:
                timeline.append((round(now, 1), anon, values.get("RssFile", 0)))
                next_sample = now + args.timeline
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(args.interval)
    exit_code = os.waitstatus_to_exitcode(status)
    result = {
        "command": command,
        "exit_code": exit_code,
        "wall_seconds": round(time.monotonic() - started, 2),
        # CPU time says more than wall time on a shared machine.
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_bytes": peaks["VmHWM"],
        "peak_rss_anon_bytes": peaks["RssAnon"],
        "peak_rss_file_bytes": peaks["RssFile"],
        "peak_rss_shmem_bytes": peaks["RssShmem"],
        "anonymous_peak": anonymous_peak,
    }
    if args.timeline:
        result["timeline_seconds_anon_file"] = timeline
    gib = 1 << 30
    print(
        f"exit {exit_code}, {result['wall_seconds']} s ({result['cpu_seconds']} s CPU), peak RSS {peaks['VmHWM'] / gib:.2f} GiB "
        f"(anonymous {peaks['RssAnon'] / gib:.2f} GiB, file-backed {peaks['RssFile'] / gib:.2f} GiB)",
        file=sys.stderr,
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
            out.write("\n")
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
