"""One Triton server: its gRPC channel, health probe, contract check and a streamed request (asyncio, no threads).

Each request is its own `ModelStreamInfer` call on the endpoint's channel (HTTP/2 multiplexes them): one request
is written and the writing side closed, and a reader task reads responses until the final-response flag (or the
server ends the call). When the consumer stops early the call is cancelled, which is what reaches Triton: its gRPC
frontend marks the request cancelled (`request.is_cancelled()` in a Python-backend model) and sends nothing more.
Triton before 2.53 (24.12) can crash when a stream is cancelled while the model is sending (2.51 did here, see
docs/triton.md); there, by default, the rest of the request is read and dropped instead, and closing the stream
waits for that, so the request keeps its admission slot while it drains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncGenerator, AsyncIterator, Optional, Union

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from wyoming_cosyvoice.aio import TaskSet

from .contract import Contract, ContractError, check_config, is_final, read_response
from .settings import CANCEL_SAFE_VERSION

_LOGGER = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC message limit, as tritonclient sets it (a 30 s reference is ~2 MB; long waveforms can be larger)."""

_TRANSPORT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class EndpointFailure(Exception):
    """A request failed on one endpoint; `unhealthy` when the endpoint itself is unreachable, broke or stalled
    (a model error is the request's problem, not the endpoint's)."""

    def __init__(self, reason: str, unhealthy: bool) -> None:
        super().__init__(reason)
        self.unhealthy = unhealthy


def rpc_problem(err: grpc.RpcError) -> str:
    """A short one-line reason from a gRPC error (its details can span lines and addresses)."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        for marker, text in (
            ("Connection refused", "connection refused"),
            ("No route to host", "no route to host"),
            ("Name or service not known", "unknown host"),
            ("DNS resolution failed", "unknown host"),
            ("Socket closed", "connection closed"),
            ("Connection reset", "connection reset"),
        ):
            if marker in details:
                return f"unreachable: {text}"
        return "unreachable"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    first = details.splitlines()[0] if details else ""
    name = code.name if code is not None else type(err).__name__
    return f"{name.lower()}: {first[:160]}" if first else name.lower()


async def _outlast(task: "asyncio.Task[None]") -> None:
    """Wait for `task` to end even when cancelled meanwhile (the cancellation is passed on after): a client that
    leaves is noticed twice (a failed write, then EOF), and the second must not cut the wait short. The engine's
    `close` (shutdown) ends the task, so the wait is bounded."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                break
            cancelled = True
        except Exception:  # the reader's own failure: nothing left to wait for
            break
    if cancelled:
        raise asyncio.CancelledError()


def parse_version(text: str) -> tuple[int, ...]:
    """`2.51.0` -> (2, 51, 0); () when it is not a version."""
    parts = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


class Endpoint:
    """A Triton server serving upstream's CosyVoice model; `state` is unknown, ready or down."""

    def __init__(self, url: str, target: str, model: str, connect_timeout: float, cancel: Union[bool, str]) -> None:
        self.url = url
        """As configured (grpc://host:port)."""
        self.target = target
        """gRPC target (host:port)."""
        self.model = model
        self.connect_timeout = connect_timeout
        self.state = "unknown"
        self.problem = ""
        """Why the endpoint is down (one line)."""
        self.permanent = False
        """The problem is configuration (unknown model, wrong contract), not something a restart of Triton fixes."""
        self.contract: Optional[Contract] = None
        self.outstanding = 0
        """Requests running on this endpoint now."""
        self.served = 0
        """Requests that got audio from this endpoint."""
        self.failed = 0
        """Requests that failed on this endpoint."""
        self.draining = 0
        """Requests whose client left, read to their end instead of cancelled (see `may_cancel`)."""
        self.version = ""
        """Triton's version (ServerMetadata), e.g. 2.51.0."""
        self.cancel = cancel
        self._readers = TaskSet()
        self._channel: Optional[grpc.aio.Channel] = None
        self._stub: Any = None

    def _connection(self) -> Any:
        # Made on first use, inside the serving event loop (a grpc.aio channel belongs to the loop it was made in).
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.target,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.keepalive_time_ms", 30000),
                    ("grpc.keepalive_timeout_ms", 10000),
                    # Reconnect soon after a Triton restart instead of gRPC's default backoff of up to 2 minutes.
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def mark_down(self, problem: str, permanent: bool = False) -> None:
        """Take the endpoint out of rotation until a probe finds it ready."""
        if self.state != "down" or self.problem != problem:
            _LOGGER.warning("Triton endpoint %s is down: %s", self.url, problem)
        self.state, self.problem, self.permanent = "down", problem, permanent

    def mark_ready(self) -> None:
        """Back in rotation."""
        if self.state == "down":
            _LOGGER.info("Triton endpoint %s is ready again", self.url)
        self.state, self.problem, self.permanent = "ready", "", False

    async def probe(self) -> bool:
        """Server live, server ready, model ready, and (once) the model's contract; updates `state`."""
        stub = self._connection()
        timeout = self.connect_timeout
        try:
            if not (await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout)).live:
                self.mark_down("server not live")
                return False
            if not (await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)).ready:
                self.mark_down("server not ready")
                return False
            ready = await stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout)
            if not ready.ready:
                await self._model_missing(stub, timeout)
                return False
            if self.contract is None:
                config = await stub.ModelConfig(service_pb2.ModelConfigRequest(name=self.model), timeout=timeout)
                self.contract = check_config(config.config, self.model)
                metadata = await stub.ServerMetadata(service_pb2.ServerMetadataRequest(), timeout=timeout)
                self.version = metadata.version
                if self.cancel == "auto" and not self.may_cancel:
                    _LOGGER.warning(
                        "Triton %s at %s can crash when a streaming request is cancelled (fixed in Triton 2.53, "
                        "release 24.12): a request whose client left is read to its end instead. Upgrade Triton, "
                        "or set engines.triton.cancel_requests: true",
                        self.version or "(unknown version)",
                        self.url,
                    )
        except ContractError as err:
            self.mark_down(str(err), permanent=True)
            return False
        except grpc.RpcError as err:
            self.mark_down(rpc_problem(err))
            return False
        self.mark_ready()
        return True

    async def _model_missing(self, stub: Any, timeout: float) -> None:
        """Not ready: still loading (transient) or not in the repository at all (configuration)."""
        index = await stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=timeout)
        models = {m.name: m.state for m in index.models}
        if self.model not in models:
            known = ", ".join(sorted(models)) or "none"
            self.mark_down(f"no model {self.model!r} on this server (models: {known})", permanent=True)
        else:
            self.mark_down(f"model {self.model!r} not ready: {(models[self.model] or 'loading').lower()}")

    @property
    def may_cancel(self) -> bool:
        """Whether requests are cancelled when their client leaves (cancel_requests, and the server's version)."""
        if isinstance(self.cancel, bool):
            return self.cancel
        return parse_version(self.version) >= CANCEL_SAFE_VERSION

    async def _connect(self) -> None:
        """Wait for a connection (bounded); a refused one fails at once instead of waiting out the timeout."""
        self._connection()
        assert self._channel is not None
        deadline = time.monotonic() + self.connect_timeout
        state = self._channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise EndpointFailure("unreachable", unhealthy=True)
            left = deadline - time.monotonic()
            if left <= 0:
                raise EndpointFailure(f"no connection within {self.connect_timeout:g} s", unhealthy=True)
            try:
                await asyncio.wait_for(self._channel.wait_for_state_change(state), left)
            except asyncio.TimeoutError:
                continue
            state = self._channel.get_state(try_to_connect=True)

    async def stream(
        self, request: Any, first_timeout: float, chunk_timeout: float
    ) -> AsyncGenerator[np.ndarray, None]:
        """The waveform pieces of one request as Triton sends them; EndpointFailure when it fails or stalls.

        Closing the iterator early cancels the gRPC call (Triton then marks the request cancelled), or, where that
        is unsafe (`may_cancel`), lets the rest arrive in the background and drops it.
        """
        await self._connect()

        async def one_request() -> AsyncIterator[Any]:
            yield request

        call = self._stub.ModelStreamInfer(one_request())
        inbox: "asyncio.Queue[tuple[str, Any]]" = asyncio.Queue()
        dropping = [False]

        async def read_all() -> None:
            # The gRPC reads happen in this task, never in the consumer: grpc.aio cancels the whole call when a
            # read is cancelled, and the consumer is cancelled whenever its Wyoming client leaves.
            timeout, what = first_timeout, "first audio"
            try:
                while True:
                    try:
                        response = await asyncio.wait_for(call.read(), timeout)
                    except asyncio.TimeoutError:  # stalled (nothing in flight): the call was cancelled, safely
                        inbox.put_nowait(("stall", f"no {what} within {timeout:g} s"))
                        return
                    if response is grpc.aio.EOF:  # the server ended the call: every response has arrived
                        inbox.put_nowait(("end", None))
                        return
                    if not dropping[0]:
                        inbox.put_nowait(("response", response))
                    if is_final(response):
                        inbox.put_nowait(("end", None))
                        return
                    timeout, what = chunk_timeout, "audio for the next chunk"
            except grpc.RpcError as err:
                inbox.put_nowait(("error", err))
            except asyncio.CancelledError:  # the call was cancelled (client left, or shutdown)
                inbox.put_nowait(("end", None))
            finally:
                if dropping[0]:
                    self.draining -= 1

        reader = self._readers.add(asyncio.get_running_loop().create_task(read_all(), name=f"triton stream {self.url}"))
        finished = False
        try:
            while True:
                kind, item = await inbox.get()
                if kind == "end":
                    finished = True
                    return
                if kind == "stall":
                    finished = True
                    raise EndpointFailure(item, unhealthy=True)
                if kind == "error":
                    finished = True
                    raise EndpointFailure(rpc_problem(item), unhealthy=item.code() in _TRANSPORT)
                if item.error_message:  # the final flag follows
                    raise EndpointFailure(f"model error: {item.error_message.splitlines()[0]}", unhealthy=False)
                wave, final = read_response(item)
                if wave is not None and wave.size:
                    yield wave
                if final:
                    finished = True
                    return
        finally:
            if not finished and not reader.done():
                if self.may_cancel:
                    call.cancel()
                else:
                    dropping[0] = True
                    self.draining += 1
                    # The request runs on Triton to its end either way: closing waits for it, so it keeps its
                    # admission slot (server.max_concurrent) instead of piling up behind clients that hung up.
                    await _outlast(reader)

    def summary(self) -> str:
        """`host:port ready; 1 active; 12 served` for health and describe (no commas or parentheses: describe's
        health line is parsed on them)."""
        parts = [self.target, self.state if self.state != "down" else f"down: {self.problem}"]
        if self.version:
            parts.append(f"triton {self.version}")
        parts.append(f"{self.outstanding} active")
        if self.draining:
            parts.append(f"{self.draining} draining")
        parts.append(f"{self.served} served")
        if self.failed:
            parts.append(f"{self.failed} failed")
        text = "; ".join([f"{parts[0]} {parts[1]}", *parts[2:]])
        return text.replace(", ", "; ").replace("(", "[").replace(")", "]")

    async def close(self) -> None:
        """Close the channel (running calls are cancelled)."""
        self._readers.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None
