"""Port forwarding over an SSH connection: a listener on this machine's 127.0.0.1 whose
connections are carried to a port on the instance (no port opens on the instance)."""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.transport.ssh_remote import SSHRemote

log = logging.getLogger(__name__)


class Forward:
    """A listener on 127.0.0.1 whose connections are carried to ``host:port`` on the
    instance through direct-tcpip channels (no port is opened on the instance)."""

    def __init__(self, remote: SSHRemote, host: str, port: int) -> None:
        self.remote = remote
        self.dest = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, name=f"ssh-forward-{self.port}",
                                       daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        try:
            chan = self.remote.transport().open_channel(
                "direct-tcpip", self.dest, client.getpeername(), timeout=15)
        except Exception as exc:  # noqa: BLE001
            log.debug("forward to %s failed: %s", self.dest, exc)
            client.close()
            return
        try:
            while not self.stopped.is_set():
                ready, _, _ = select.select([client, chan], [], [], 0.5)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
        except OSError:
            pass
        finally:
            chan.close()
            client.close()

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.thread.join(timeout=2)
