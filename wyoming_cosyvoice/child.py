"""One engine child process: what runs inside it, and the server's handle on it (the pipe protocol between them)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Optional

from .handoff import RequestCancelled

_LOGGER = logging.getLogger(__name__)

BOOT = "import sys; sys.path.insert(0, sys.argv[2]); from wyoming_cosyvoice.child import child_main; child_main()"
"""A child is a fresh interpreter (the server runs threads and an event loop, which must never be forked without an
exec) that imports only this module before it reads its spec: unlike multiprocessing's spawn, it does not run the
server's main script again (a script without a main guard would start a server in every child) and needs no
resource-tracker process."""

POLL_S = 0.1
"""How often a waiting side looks at its cancel flag (the pipe itself wakes it as soon as a message comes)."""

PARENT_CHECK_S = 1.0
"""How often a child checks that the server is still its parent (a child busy in native code cannot see the pipe
close; a child whose server is gone exits)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[child %(process)d]: %(message)s"


class ChildDied(Exception):
    """The child process ended (crashed, killed) while the server waited for it; the message says how."""


class ChildHung(Exception):
    """The child did not answer in time (a cancelled request it does not stop, a call past its timeout); it was
    killed."""


@dataclass(frozen=True)
class ChildSpec:
    """How a child process rebuilds the engine: `module.qualname(*args)` (args pickled, so the module is imported
    before they are read: a plugins-folder module is loaded from `file`)."""

    module: str
    file: Optional[str]
    qualname: str
    args: bytes
    log_level: int
    path: tuple[str, ...]
    """The server's sys.path (where the engine's module and its settings' classes are found)."""

    @classmethod
    def of(cls, engine_type: type, args: tuple[Any, ...]) -> "ChildSpec":
        """The spec for `engine_type(*args)` (TypeError/PicklingError when args cannot be pickled)."""
        module = sys.modules.get(engine_type.__module__)
        return cls(
            engine_type.__module__,
            getattr(module, "__file__", None),
            engine_type.__qualname__,
            pickle.dumps(args),
            logging.getLogger().getEffectiveLevel(),
            tuple(sys.path),
        )

    def build(self) -> Any:
        """Import the module (by name, else from its file) and construct the engine (in the child)."""
        sys.path[:] = list(self.path)
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError:
            if not self.file:
                raise
            spec = importlib.util.spec_from_file_location(self.module, self.file)
            if spec is None or spec.loader is None:
                raise
            parent = self.module.rpartition(".")[0]
            if parent and parent not in sys.modules:  # a plugins-folder module's package (plugins.USER_PACKAGE)
                sys.modules[parent] = types.ModuleType(parent)
                sys.modules[parent].__path__ = []
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.module] = module
            spec.loader.exec_module(module)
        target: Any = module
        for part in self.qualname.split("."):
            target = getattr(target, part)
        return target(*pickle.loads(self.args))


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling (the server raises it as if raised on its own thread), else a RuntimeError
    carrying its type and message."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _watch_parent(parent: int) -> None:
    """Exit when the server is gone (its process ended without stopping this one: SIGKILL, a crash)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


class _Serving:
    """The child's request loop: render and call messages in, chunks and results out, one at a time."""

    def __init__(self, conn: Connection, engine: Any) -> None:
        self.conn = conn
        self.engine = engine
        self.busy = False
        self.stopping = False

    def on_term(self, _signum: int, _frame: Any) -> None:
        """SIGTERM (a service manager stopping the whole group): finish the request in hand, then exit."""
        self.stopping = True
        if not self.busy:
            raise SystemExit(0)

    def run(self) -> None:
        while not self.stopping:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server closed its end
                return
            kind = message[0]
            if kind == "stop":
                return
            self.busy = True
            try:
                if kind == "render":
                    self.render(*message[1:])
                elif kind == "call":
                    self.call(*message[1:])
                # "cancel" of a request that has already ended: nothing to do
            finally:
                self.busy = False

    def render(self, rid: int, text: str, profile: Any, options: Any) -> None:
        cancel = threading.Event()
        conn = self.conn

        def emit(pcm: bytes) -> None:
            if conn.poll():  # only a cancel (or stop) can come while a request runs
                message = conn.recv()
                if message[0] == "stop" or (message[0] == "cancel" and message[1] == rid):
                    cancel.set()
            if cancel.is_set():
                raise RequestCancelled()
            if pcm:
                conn.send(("chunk", pcm))

        reply: tuple[Any, ...] = ("end", rid)
        try:
            self.engine.render(text, profile, options, emit, cancel)
        except RequestCancelled:
            pass
        except BaseException as err:  # forwarded: the server raises it for this request
            self.after_error(err)
            reply = ("error", rid, _portable(err))
        conn.send(reply)

    def call(self, name: str, args: tuple[Any, ...]) -> None:
        try:
            reply: tuple[Any, ...] = ("result", None, getattr(self.engine, name)(*args))
            self.conn.send(reply)
        except BaseException as err:
            self.after_error(err)
            self.conn.send(("error", None, _portable(err)))

    def after_error(self, err: BaseException) -> None:
        from .engine import is_out_of_memory  # the engine layer, imported here only (it imports this module)

        if is_out_of_memory(err):
            self.engine.release_memory()


def child_main() -> None:
    """Entry point of a child process (`BOOT`; its pipe is fd argv[1]): read the spec, build and load the engine,
    say "ready" (or why not), then serve until told to stop or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    conn = Connection(int(sys.argv[1]))
    try:
        spec: ChildSpec = conn.recv()
    except (EOFError, OSError):
        return
    logging.basicConfig(level=spec.log_level, format=LOG_FORMAT)
    try:
        engine = spec.build()
        engine.load()
    except BaseException as err:
        conn.send(("failed", _portable(err)))
        return
    conn.send(
        ("ready", {"sample_rate": engine.sample_rate, "sample_width": engine.sample_width, "channels": engine.channels})
    )
    serving = _Serving(conn, engine)
    signal.signal(signal.SIGTERM, serving.on_term)
    try:
        serving.run()
    except SystemExit:
        pass


class Child:
    """The server's handle on one child process. One thread uses it at a time (the pool hands it out); `kill` may
    come from any thread."""

    def __init__(self, spec: ChildSpec, name: str) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(theirs.fileno()), str(Path(__file__).resolve().parents[1])],
                stdin=subprocess.DEVNULL,
                stdout=2,  # never the server's stdout: over stdio:// that is the Wyoming connection
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.name = name
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(spec)
        except OSError:  # it died at once: `wait_ready` says how
            pass
        self.pid: int = self.process.pid
        self.facts: Optional[dict[str, Any]] = None
        """Audio format the engine reported once loaded (None while it loads)."""
        self._early: Optional[tuple[Any, ...]] = None  # the first message, when `loaded` read it
        self._lock = threading.Lock()
        self._released = False

    def loaded(self) -> bool:
        """True once the engine has loaded (never blocks; for an idle child only: a loading one's first message
        is read here or by `wait_ready`)."""
        if self.facts is None and self._early is None:
            try:
                if self._conn.poll(0):
                    self._early = self._conn.recv()
            except (EOFError, OSError):
                self._early = ("died",)
            if self._early is not None and self._early[0] == "ready":
                self.facts, self._early = self._early[1], None
        return self.facts is not None

    def wait_ready(self, timeout: float, tick: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """Wait for the engine to load; its facts. The child's own load error is raised as it was raised there;
        ChildDied / ChildHung when it died or took longer than `timeout`. `tick` is called every POLL_S while it
        waits (a request's keep-alive; it may raise RequestCancelled)."""
        if self.facts is None:
            message, self._early = self._early, None
            deadline = time.monotonic() + timeout
            while message is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise ChildHung(f"did not load within {timeout:g} s")
                if self._poll(min(left, POLL_S) if tick is not None else left):
                    message = self._recv()
                elif tick is not None:
                    tick()
            if message[0] == "died":
                raise ChildDied(self.death())
            if message[0] == "failed":
                raise message[1]
            self.facts = message[1]
        return self.facts

    def render(
        self,
        rid: int,
        request: tuple[str, Any, Any],
        emit: Callable[[bytes], None],
        cancel: threading.Event,
        grace: float,
    ) -> None:
        """Run one request (text, profile, options) in the child, passing each chunk to `emit`. When `cancel` is
        set the child is told to stop; one that has not stopped `grace` s later is killed (ChildHung)."""
        self._send(("render", rid, *request))
        cancelled_at: Optional[float] = None
        while True:
            if cancelled_at is None and cancel.is_set():
                cancelled_at = time.monotonic()
                self._send(("cancel", rid))
            if cancelled_at is not None and time.monotonic() - cancelled_at > grace:
                self.kill()
                raise ChildHung(f"did not stop within {grace:g} s of its request being cancelled")
            if not self._poll(POLL_S):
                continue
            message = self._recv()
            if message[0] == "chunk":
                if cancelled_at is None:
                    try:
                        emit(message[1])
                    except RequestCancelled:  # the consumer left: `cancel` is set, the next turn tells the child
                        pass
            elif message[1] == rid:
                if message[0] == "error":
                    raise message[2]
                if cancel.is_set():
                    raise RequestCancelled()
                return

    def call(self, name: str, args: tuple[Any, ...], timeout: Optional[float]) -> Any:
        """Run the engine's method `name(*args)` in the child; its result, or its error raised here."""
        self._send(("call", name, args))
        if not self._poll(timeout):
            self.kill()
            raise ChildHung(f"{name} did not finish within {timeout:g} s")
        message = self._recv()
        if message[0] == "error":
            raise message[2]
        return message[2]

    def _poll(self, timeout: Optional[float]) -> bool:
        try:
            return self._conn.poll(timeout)
        except (EOFError, OSError):
            raise ChildDied(self.death()) from None

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (EOFError, OSError):
            raise ChildDied(self.death()) from None

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise ChildDied(self.death()) from None

    def death(self) -> str:
        """How the process ended: the signal's name (SIGSEGV, SIGABRT) or its exit code."""
        try:
            code = self.process.wait(2.0)
        except subprocess.TimeoutExpired:
            self.kill()
            return "closed its pipe and was killed"
        if code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    def stop(self) -> None:
        """Ask an idle child to exit (it finishes nothing: nothing is in hand)."""
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass

    def kill(self) -> None:
        """End the process now (any thread)."""
        with self._lock:
            if not self._released and self.process.poll() is None:
                self.process.kill()

    def release(self, timeout: float = 2.0) -> None:
        """Wait up to `timeout` s for the process to end, kill it if it has not, reap it and close its pipe."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        with self._lock:
            if self._released:
                return
            self._released = True
        self.process.wait()
        self._conn.close()
