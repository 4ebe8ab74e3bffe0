"""What the SSH layer costs against a real OpenSSH server on 127.0.0.1.

Starts a private sshd (the same one the tests use) and prints: connect time, the
round trip of a trivial command, throughput of a command flooding stdout and stderr,
SFTP upload and download throughput, and the local provider's command round trip for
comparison. Figures are printed, not asserted: the run controller's budgets (health
polling, suite start) are judged against them.

    python benchmarks/bench_ssh.py [-n 20] [--mib 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _median(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:.1f} ms, max {max(samples) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="repetitions of the small steps")
    parser.add_argument("--mib", type=int, default=32, help="MiB per bulk transfer")
    args = parser.parse_args()

    from ephemera_providers.local import LocalRemote

    from ephemera.transport.ssh import Target, connect
    from ephemera.transport.ssh_remote import SSHRemote
    from tests.fixtures.sshd import start_sshd, stop_sshd

    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as tmp:
        work = Path(tmp)
        proc, server = start_sshd(work / "sshd")
        try:
            target = Target(host=server.host, port=server.port, user=server.user,
                            key_path=server.key_path)
            times = []
            for _ in range(args.n):
                t = time.perf_counter()
                connect(target, deadline=20).close()
                times.append(time.perf_counter() - t)
            print(f"connect (TCP + handshake + auth): {_median(times)}")

            remote = SSHRemote(target)
            remote.run("true", timeout=20)
            times = []
            for _ in range(args.n):
                t = time.perf_counter()
                remote.run("true", timeout=20)
                times.append(time.perf_counter() - t)
            print(f"run('true') on an open connection: {_median(times)}")

            size = args.mib * 1024 * 1024
            gen = f"head -c {size} /dev/zero | tr '\\0' x | fold -w 1024"
            t = time.perf_counter()
            result = remote.run(f"({gen}) & ({gen}) >&2; wait", timeout=600,
                                on_line=lambda line: None)
            took = time.perf_counter() - t
            assert result.ok
            print(f"run() draining {2 * args.mib} MiB (stdout + stderr): {took:.2f} s, "
                  f"{2 * args.mib / took:.1f} MiB/s")

            blob = work / "blob.bin"
            blob.write_bytes(os.urandom(size))
            t = time.perf_counter()
            remote.put(blob, str(work / "up" / "blob.bin"), timeout=600)
            took = time.perf_counter() - t
            print(f"SFTP upload {args.mib} MiB: {took:.2f} s, {args.mib / took:.1f} MiB/s")
            t = time.perf_counter()
            remote.get(str(work / "up" / "blob.bin"), work / "down", timeout=600)
            took = time.perf_counter() - t
            print(f"SFTP download {args.mib} MiB: {took:.2f} s, {args.mib / took:.1f} MiB/s")
            remote.close()

            local = LocalRemote(work)
            times = []
            for _ in range(args.n):
                t = time.perf_counter()
                local.run("true", timeout=20)
                times.append(time.perf_counter() - t)
            print(f"local provider run('true'): {_median(times)}")
        finally:
            stop_sshd(proc)


if __name__ == "__main__":
    main()
