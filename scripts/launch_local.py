"""Run one command as N local JAX processes with M emulated CPU devices each.

    python scripts/launch_local.py --processes 2 --devices 4 -- python my_job.py --flag

Each process gets ``SMAP_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port),
``SMAP_NUM_PROCESSES``, ``SMAP_PROCESS_ID`` and ``SMAP_CPU_DEVICES``, which
``sharding.initialize()`` reads, and CPU-only JAX settings. Output is
forwarded line by line with a ``[p<i>]`` prefix. If a process fails, the
others are stopped and the launcher exits non-zero; the whole run is bounded
by ``--timeout`` seconds (exit code 124).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def forward(prefix: str, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()
    stream.close()


def stop(processes: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every live process group, then SIGKILL what is left after `grace` seconds."""
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            p.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def launch(command: list[str], processes: int, devices: int, timeout: float) -> int:
    port = free_port()
    lock = threading.Lock()
    children: list[subprocess.Popen] = []
    threads = []
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    for i in range(processes):
        env = {
            **base,
            "SMAP_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "SMAP_NUM_PROCESSES": str(processes),
            "SMAP_PROCESS_ID": str(i),
            "SMAP_CPU_DEVICES": str(devices),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            child = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        except OSError as error:  # no such program, not executable, ...
            print(f"[launch] cannot start {command[0]!r}: {error.strerror}.", flush=True)
            stop(children)
            return 127
        children.append(child)
        thread = threading.Thread(target=forward, args=(f"[p{i}]", child.stdout, lock), daemon=True)
        thread.start()
        threads.append(thread)

    deadline = time.monotonic() + timeout
    status = 0
    try:
        while True:
            codes = [c.poll() for c in children]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"[launch] process {i} {describe_exit(code)}; stopping the others.", flush=True)
                status = 1
                break
            if all(code == 0 for code in codes):
                break
            if time.monotonic() > deadline:
                print(f"[launch] timed out after {timeout:.0f} s; stopping all processes.", flush=True)
                status = 124
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        status = 130
    finally:
        stop(children)
        for thread in threads:
            thread.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", "-n", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--devices", "-d", type=int, default=1, help="emulated CPU devices per process (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before every process is stopped")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.devices < 1:
        parser.error(f"--devices must be at least 1, got {args.devices}")
    if not args.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    return launch(command, args.processes, args.devices, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
