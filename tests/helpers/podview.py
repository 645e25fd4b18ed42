"""Runs inside a pod's mount namespace (started by :class:`tests.helpers.namespaces.PodView`) and
answers one command per line about the volume at TARGET, as a container would see it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys


def _error(exc: OSError) -> str:
    return f"ERR {errno.errorcode.get(exc.errno or 0, str(exc.errno))}"


def answer(target: str, line: str) -> str:
    command, _, rel = line.partition(" ")
    path = os.path.join(target, rel)
    try:
        if command == "hash":
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()
        if command == "create":
            with open(path, "xb") as handle:
                handle.write(b"x")
            return "WRITTEN"
        if command == "append":
            with open(path, "ab") as handle:
                handle.write(b"x")
            return "WRITTEN"
        if command == "ls":
            return json.dumps(sorted(os.listdir(path)))
        if command == "options":
            with open("/proc/self/mountinfo") as handle:
                mounts = [line.split() for line in handle if line.split()[4] == os.path.normpath(target)]
            return mounts[-1][5] if mounts else "ERR NOTMOUNTED"
    except OSError as exc:
        return _error(exc)
    return "ERR UNKNOWN-COMMAND"


def main() -> None:
    target = sys.argv[1]
    print("READY", flush=True)
    for line in sys.stdin:
        print(answer(target, line.strip()), flush=True)


if __name__ == "__main__":
    main()
