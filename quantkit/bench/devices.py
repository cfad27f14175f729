"""Where the measuring child runs: this machine, a machine reached over SSH, or (designed, untested on
hardware) an Android phone over adb.

A device stages what the child needs (the artifact, and for remote devices a runner: quantkit's pure-Python
package as one zip, imported from ``PYTHONPATH``, so the remote needs only Python and the runtime's own
package), runs ``python -m quantkit.bench.child SPEC`` there, streams its JSON lines back and cleans up.
``probe()`` describes the machine that measures (CPU, cores, memory, OS, runtime versions), which is the
machine the environment line must describe.

Adding a device is one class with ``name``, ``probe``, ``stage``, ``run`` and ``close``, and a line in
``device_for``.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from quantkit.errors import QuantkitError

RunHandle = tuple[subprocess.Popen, Iterator[dict], Callable[[], str]]


def _stream(process: subprocess.Popen) -> RunHandle:
    def lines() -> Iterator[dict]:
        for line in process.stdout:
            if line.startswith("{"):
                yield json.loads(line)
        process.wait()

    def stderr_tail() -> str:
        text = process.stderr.read() if process.stderr else ""
        return text.strip().splitlines()[-1] if text.strip() else f"exit status {process.returncode}"

    return process, lines(), stderr_tail


def child_command(python: str, spec: dict) -> list[str]:
    return [python, "-m", "quantkit.bench.child", json.dumps(spec)]


class LocalDevice:
    """Runs each measuring child on this machine, from the installed quantkit."""

    name = "local"

    def probe(self) -> dict:
        from quantkit.bench.child import machine

        return machine()

    def stage(self, path: Path) -> str:
        return str(path)

    def run(self, spec: dict) -> RunHandle:
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        return _stream(subprocess.Popen(child_command(sys.executable, spec), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env))

    def close(self) -> None:
        pass


def runner_zip() -> bytes:
    """quantkit's package as a zip the remote imports from ``PYTHONPATH`` (the bundled model and caches left
    out: the child needs only ``quantkit.bench`` and the runtime helpers)."""
    import quantkit

    root = Path(quantkit.__file__).parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(root.rglob("*.py")):
            relative = file.relative_to(root)
            if "__pycache__" in relative.parts or relative.parts[0] == "assets":
                continue
            archive.write(file, Path("quantkit") / relative)
    return buffer.getvalue()


class SshDevice:
    """A machine reached with the system's ``ssh`` client (keys from ssh-agent, ``~/.ssh/config`` or
    ``identity``; no password prompts: BatchMode). Each bench run stages into a fresh remote temporary folder
    and removes it at the end."""

    RUNNER = "quantkit-runner.zip"

    def __init__(self, url: str, identity: str | None = None, python: str = "python3",
                 extra_options: tuple[str, ...] = ()):
        parts = urlsplit(url if "://" in url else f"ssh://{url}")
        if parts.scheme != "ssh" or not parts.hostname:
            raise QuantkitError(f"--device {url!r}: expected ssh://[user@]host[:port]")
        self.host, self.user, self.port = parts.hostname, parts.username, parts.port or 22
        self.identity, self.python, self.extra_options = identity, python, extra_options
        self.name = f"ssh:{self.user + '@' if self.user else ''}{self.host}:{self.port}"
        self.remote_dir: str | None = None

    # ---- plumbing ----------------------------------------------------------------------------
    def _options(self) -> list[str]:
        options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", *self.extra_options]
        if self.identity:
            options += ["-i", self.identity]
        return options

    def _destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_command(self, remote: str) -> list[str]:
        return ["ssh", "-p", str(self.port), *self._options(), self._destination(), remote]

    def _ssh(self, remote: str, data: bytes | None = None) -> str:
        done = subprocess.run(self.ssh_command(remote), input=data, capture_output=True)
        if done.returncode:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            raise QuantkitError(f"{self.name}: '{remote[:60]}' failed ({message[-1] if message else done.returncode}); "
                                "check that 'ssh' reaches the host without a password prompt")
        return done.stdout.decode()

    def _copy(self, local: Path, remote_dir: str) -> None:
        """Send a file or folder as a tar stream into ``remote_dir`` (plain ssh and tar: no SFTP server needed)."""
        process = subprocess.Popen(self.ssh_command(f"tar -x -f - -C {shlex.quote(remote_dir)}"),
                                   stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=process.stdin, mode="w|") as archive:
                archive.add(local, arcname=local.name)
            process.stdin.close()
        except BrokenPipeError:
            pass
        error = process.stderr.read().decode(errors="replace").strip()
        if process.wait():
            raise QuantkitError(f"{self.name}: copying {local} failed ({error[-200:] or process.returncode})")

    def _workdir(self) -> str:
        if self.remote_dir is None:
            self.remote_dir = self._ssh("mktemp -d -t quantkit-bench.XXXXXX").strip()
            self._ssh(f"cat > {shlex.quote(self.remote_dir + '/' + self.RUNNER)}", runner_zip())
        return self.remote_dir

    def _environment(self, threads: int) -> str:
        runner = shlex.quote(f"{self._workdir()}/{self.RUNNER}")
        return f"cd {shlex.quote(self._workdir())} && PYTHONPATH={runner} OMP_NUM_THREADS={threads}"

    # ---- device interface --------------------------------------------------------------------
    def probe(self) -> dict:
        remote = f"{self._environment(1)} {shlex.quote(self.python)} -m quantkit.bench.child --probe"
        return json.loads(self._ssh(remote).strip().splitlines()[-1])

    def stage(self, path: Path) -> str:
        self._copy(path, self._workdir())
        return f"{self._workdir()}/{path.name}"

    def run(self, spec: dict) -> RunHandle:
        remote = f"{self._environment(spec['threads'])} " + shlex.join(child_command(self.python, spec))
        return _stream(subprocess.Popen(self.ssh_command(remote), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))

    def close(self) -> None:
        if self.remote_dir is not None:
            subprocess.run(self.ssh_command(f"rm -rf {shlex.quote(self.remote_dir)}"), capture_output=True)
            self.remote_dir = None


class AdbDevice:
    """An Android phone over ``adb`` — DESIGNED, NOT TESTED ON HARDWARE (no phone here); ``commands`` lists what
    a run executes, ``run`` refuses until it has been tried on a device.

    Plan: a Python for Android (e.g. Termux's, with ``llama-cpp-python`` / ``onnxruntime`` built for it) or,
    for .pte, ExecuTorch's prebuilt ``llama_main`` runner; artifacts and the runner zip pushed to
    ``/data/local/tmp/quantkit-bench``; the child run with ``adb shell`` and its JSON lines read from stdout;
    ``taskset`` pins big cores when --pin is given; memory from the child's own /proc reads, as locally."""

    REMOTE = "/data/local/tmp/quantkit-bench"

    def __init__(self, serial: str | None = None, python: str = "python3"):
        self.serial, self.python = serial, python
        self.name = f"adb:{serial or 'default'}"

    def _adb(self) -> list[str]:
        return ["adb", *(["-s", self.serial] if self.serial else [])]

    def commands(self, spec: dict, artifact: Path) -> list[list[str]]:
        remote_artifact = f"{self.REMOTE}/{artifact.name}"
        remote_spec = {**spec, "path": remote_artifact}
        pin = f"taskset {sum(1 << c for c in spec['pin']):x} " if spec.get("pin") else ""
        child = (f"cd {self.REMOTE} && PYTHONPATH={self.REMOTE}/quantkit-runner.zip "
                 f"OMP_NUM_THREADS={spec['threads']} {pin}" + shlex.join(child_command(self.python, remote_spec)))
        return [
            [*self._adb(), "shell", f"mkdir -p {self.REMOTE}"],
            [*self._adb(), "push", "quantkit-runner.zip", f"{self.REMOTE}/quantkit-runner.zip"],
            [*self._adb(), "push", str(artifact), remote_artifact],
            [*self._adb(), "shell", child],
            [*self._adb(), "shell", f"rm -rf {self.REMOTE}"],
        ]

    def _untested(self, *_args) -> dict:
        raise QuantkitError("adb devices are designed but untested on hardware; see docs/bench-devices.md")

    probe = stage = run = _untested

    def close(self) -> None:
        pass


def device_for(spec: str | None, identity: str | None = None, python: str = "python3"):
    """``local`` (default), ``ssh://[user@]host[:port]`` or ``adb[:SERIAL]``."""
    if spec in (None, "", "local"):
        return LocalDevice()
    if spec.startswith("ssh://"):
        return SshDevice(spec, identity, python)
    if spec == "adb" or spec.startswith("adb:"):
        return AdbDevice(spec.partition(":")[2] or None, python)
    raise QuantkitError(f"--device {spec!r}: expected local, ssh://[user@]host[:port] or adb[:SERIAL]")
