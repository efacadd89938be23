"""Runs a command and reports its wall time and peak memory, sampled from /proc (Linux).

usage: python3 bench/peak_memory.py [--json FILE] [--interval S] -- COMMAND ARGS...

Peak RSS is the kernel's high-water mark (VmHWM, read at every sample, so it is exact up to the
last sample before exit). RSS is anonymous memory (heap: the part that must fit in RAM) plus
file-backed pages (memory maps of the input, the output's data file and scratch files: page
cache the kernel can drop and read again), plus shared memory. The kernel keeps no high-water
mark per part, so the peaks of RssAnon and RssFile are the largest sampled values (every 0.1 s
by default).
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    started = time.monotonic()
    process = subprocess.Popen(command)
    peaks = dict.fromkeys(FIELDS, 0)
    while True:
        values = sample(process.pid)
        if values:
            for key, value in values.items():
                peaks[key] = max(peaks[key], value)
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
    }
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
