"""The parent's end of one worker process (private): its socket, read and written without ever
blocking the pool's thread, and a descriptor that becomes readable when the process exits.

A worker's death shows as EOF on its socket only while nothing else holds the worker's end. A
child the worker started (``os.fork``, a fork-started ``multiprocessing.Process``,
``subprocess.Popen(close_fds=False)``) inherits that end and keeps it open after the worker dies,
so the pool also watches the process itself: a pidfd (Linux 5.3+), polled elsewhere. And since such
a worker never reads again, a send must not wait for it: a message the socket cannot take now waits
in an outbox, so a full socket (a worker busy with a call, or a dead one) never stops the thread
that serves the other workers.

Messages are framed as :class:`multiprocessing.connection.Connection` frames them (a 4-byte
big-endian length; -1 and an 8-byte length past 2 GiB): the worker reads them with ``recv_bytes``.
"""

from __future__ import annotations

import collections
import itertools
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = ["Link", "watch"]

_CHUNK = 1 << 20  # bytes asked for per recv()
_IOV_MAX = 512  # buffers per sendmsg() (POSIX guarantees 16; Linux takes 1024)
_READ_LIMIT = 64 << 20  # bytes read per receive() call: a chatty worker cannot starve the others


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits; None where the OS has none."""
    pidfd_open = getattr(os, "pidfd_open", None)  # Python 3.9+ on Linux
    if pidfd_open is None:
        return None
    try:
        return int(pidfd_open(pid))
    except OSError:  # ENOSYS: a kernel before 5.3
        return None


class Link:
    """The parent's side of one worker: framed, non-blocking messages and the process's exit."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        sock.setblocking(False)  # this end only: the worker's end is another file description
        self.sock = sock
        self.proc = proc
        self.exit_fd = _pidfd(proc.pid)
        self._inbox = bytearray()
        self._outbox: collections.deque[memoryview] = collections.deque()
        self._buf = bytearray(_CHUNK)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        """Bytes wait to be written (wait for the socket to be writable, then :meth:`flush`)."""
        return bool(self._outbox)

    def send(self, data: bytes) -> None:
        """Queue one message and write what the socket takes now; never blocks."""
        n = len(data)
        header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        self._outbox.append(memoryview(header))
        self._outbox.append(memoryview(data))
        self.flush()

    def flush(self) -> None:
        """Write queued bytes until the socket is full. A worker whose end is closed drops them:
        its exit is noticed next (EOF or the pidfd) and its calls are dealt with there."""
        while self._outbox:
            try:  # one syscall for all that is queued (a header and its message at least)
                sent = self.sock.sendmsg(list(itertools.islice(self._outbox, _IOV_MAX)))
            except BlockingIOError:
                return
            except OSError:  # EPIPE, ECONNRESET: the worker is gone
                self._outbox.clear()
                return
            while sent:
                head = self._outbox[0]
                if sent >= len(head):
                    sent -= len(head)
                    self._outbox.popleft()
                else:
                    self._outbox[0] = head[sent:]
                    return  # the socket is full

    def receive(self, *, everything: bool = False) -> tuple[list[bytes], bool]:
        """The complete messages that can be read now, and whether the worker's end is closed.
        ``everything``: no limit on the bytes read (the worker has exited: this is its last say)."""
        eof = False
        read = 0
        while everything or read < _READ_LIMIT:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError:  # ECONNRESET
                eof = True
                break
            if not n:
                eof = True
                break
            with memoryview(self._buf) as view:
                self._inbox += view[:n]
            read += n
            if n < len(self._buf) and not everything:
                break  # drained for now: spare the recv that would say so
        messages = []
        while True:
            have = len(self._inbox)
            if have < 4:
                break
            (size,) = struct.unpack_from("!i", self._inbox)
            start = 4
            if size == -1:
                if have < 12:
                    break
                (size,) = struct.unpack_from("!Q", self._inbox, 4)
                start = 12
            if have < start + size:
                break
            with memoryview(self._inbox) as view:
                messages.append(bytes(view[start : start + size]))
            del self._inbox[: start + size]
        return messages, eof

    def exited(self) -> bool:
        """True once the process has exited (without reaping it where a pidfd is available)."""
        if self.exit_fd is not None:
            return self.wait_exit(0.0)
        return self.proc.poll() is not None

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit, leaving it unreaped where a
        pidfd is available (so its pid, hence its process group id, stays this pool's)."""
        if self.exit_fd is not None:
            poller = select.poll()  # not select(): a busy server's descriptors pass 1023
            poller.register(self.exit_fd, select.POLLIN)
            return bool(poller.poll(max(0.0, timeout) * 1000))
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the process; through the pidfd where there is one, which cannot reach a
        process that reused the pid, and does not reap it."""
        send = getattr(signal, "pidfd_send_signal", None)
        try:
            if self.exit_fd is not None and send is not None:
                send(self.exit_fd, signal.SIGKILL)
            else:
                self.proc.kill()
        except OSError:  # it has exited already
            pass

    def close(self) -> None:
        self._outbox.clear()
        self.sock.close()
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None


#: a link's registered socket descriptor (None: not read), its pidfd, and the socket's events
Watched = dict[Link, tuple[int | None, int | None, int]]


def watch(
    sel: selectors.BaseSelector, watched: Watched, links: Sequence[tuple[Any, Link, bool]]
) -> None:
    """Bring ``sel`` up to date with ``links`` (``(data, link, read)``): each link's pidfd, and
    its socket (readable; writable while bytes wait) while ``read`` (a link the pool no longer
    reads, a worker being ended, has only its exit watched). Closed links go first, as a new one
    may have reused their numbers."""
    current = {link for _, link, _ in links}
    for link in [link for link in watched if link not in current]:
        fd, exit_fd, _ = watched.pop(link)
        if fd is not None:
            sel.unregister(fd)
        if exit_fd is not None:
            sel.unregister(exit_fd)
    for w, link, read in links:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.wants_write else 0)
        if link not in watched:
            fd = None
            if read:
                fd = link.fileno()
                sel.register(fd, events, (w, link, "socket"))
            if link.exit_fd is not None:
                sel.register(link.exit_fd, selectors.EVENT_READ, (w, link, "exit"))
            watched[link] = (fd, link.exit_fd, events)
            continue
        fd, exit_fd, was = watched[link]
        if fd is not None and not read:  # for good: a link is not read again once let go
            sel.unregister(fd)
            watched[link] = (None, exit_fd, 0)
        elif fd is not None and was != events:
            sel.modify(fd, events, (w, link, "socket"))
            watched[link] = (fd, exit_fd, events)
