"""Command server that runs INSIDE the test guest.

Started by the harness with ``vng --exec``; it speaks JSON lines over the
virtio-serial port ``org.guestagent.test.ctl`` so a test can act in the
running guest while it acts on the host. Stdlib only, Python 3.9: it runs on
the host's interpreter through the shared root filesystem.

Requests carry an ``id`` and an ``op``; every reply echoes the ``id``:
  ping                         -> {}
  run    argv, timeout_s, input  -> rc, stdout, stderr
  spawn  argv                  -> pid (output kept for ``wait``)
  signal pid, signum           -> {}
  wait   pid, timeout_s         -> rc (None while running), stdout, stderr
  exit                         -> {} then the server ends and the guest powers off
Each request runs in its own thread so a long ``run`` does not block a ``signal``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

PORT_NAME = "org.guestagent.test.ctl"


def find_port(name: str, timeout: float) -> str:
    """The port's device node: the udev symlink, else the sysfs name lookup."""
    deadline = time.monotonic() + timeout
    while True:
        link = f"/dev/virtio-ports/{name}"
        if os.path.exists(link):
            return link
        for path in glob.glob("/sys/class/virtio-ports/*/name"):
            with open(path) as f:
                if f.read().strip() == name:
                    dev = "/dev/" + os.path.basename(os.path.dirname(path))
                    if os.path.exists(dev):
                        return dev
        if time.monotonic() > deadline:
            raise SystemExit(f"guest_ctl: port {name} did not appear")
        time.sleep(0.2)


class Server:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.write_lock = threading.Lock()
        self.children: dict[int, tuple[subprocess.Popen, Any, Any]] = {}
        self.children_lock = threading.Lock()
        self.stopping = threading.Event()

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self.write_lock:
            while data:
                try:
                    n = os.write(self.fd, data)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                data = data[n:]

    def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            reply = self.dispatch(req)
        except Exception as err:  # reported to the test, never kills the server
            reply = {"error": f"{type(err).__name__}: {err}"}
        reply["id"] = rid
        self.send(reply)

    def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {}
        if op == "run":
            try:
                proc = subprocess.run(
                    req["argv"], input=req.get("input"), capture_output=True, text=True,
                    timeout=req.get("timeout_s"), errors="replace",
                )
            except subprocess.TimeoutExpired as err:
                return {"error": f"timed out after {err.timeout} s: {req['argv']}"}
            return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        if op == "spawn":
            out = tempfile.TemporaryFile()
            err = tempfile.TemporaryFile()
            proc = subprocess.Popen(req["argv"], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err)
            with self.children_lock:
                self.children[proc.pid] = (proc, out, err)
            return {"pid": proc.pid}
        if op == "signal":
            os.kill(int(req["pid"]), int(req["signum"]))
            return {}
        if op == "wait":
            with self.children_lock:
                proc, out, err = self.children[int(req["pid"])]
            try:
                rc = proc.wait(timeout=req.get("timeout_s"))
            except subprocess.TimeoutExpired:
                rc = None
            return {"rc": rc, "stdout": _read_all(out), "stderr": _read_all(err)}
        if op == "exit":
            self.stopping.set()
            return {}
        return {"error": f"unknown op {op!r}"}

    def serve(self) -> None:
        buf = b""
        while not self.stopping.is_set():
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                chunk = None
            if not chunk:
                # Host end closed (reads return 0) or nothing yet: back off, do not spin.
                time.sleep(0.05)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line)
                except ValueError:
                    continue
                if isinstance(req, dict):
                    threading.Thread(target=self.handle, args=(req,), daemon=True).start()
        time.sleep(0.2)  # let the exit reply drain
        with self.children_lock:
            for proc, _out, _err in self.children.values():
                if proc.poll() is None:
                    proc.kill()


def _read_all(f: Any) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else PORT_NAME
    path = find_port(name, timeout=60)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    server = Server(fd)
    print(f"guest_ctl: serving on {path}", file=sys.stderr, flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
