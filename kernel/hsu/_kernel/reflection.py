"""Server reflection on the kernel's data plane, for the kernel's own services
and every interface a unit serves.

The kernel never imports a unit's generated code, so it learns what an
interface looks like from the process that serves it: it asks an instance's
own reflection service (``file_containing_symbol``) for the interface's file
and everything it imports, and keeps the files in a descriptor pool of its
own. It asks when an instance of a unit becomes ready (again whenever the
unit's version changes), and when a client asks about a symbol it does not
know yet; a unit with no instance then gets one started, as a call would.
So ``grpcurl list``, ``describe`` and calls work at the kernel's address
with no ``.proto`` (docs/architecture.md, "Reflection", says why the kernel
asks rather than the HSU sending its files when it registers).

Both versions of the protocol are served, ``grpc.reflection.v1`` (grpcurl's
first choice) and ``grpc.reflection.v1alpha``: their messages are the same on
the wire.

What an instance sends is bounded (``MAX_FILES`` files, ``MAX_BYTES``) and
checked by the pool: a file that does not parse or does not fit with the
others is left out with a warning naming the unit. The kernel's own files
(health, reflection and what they import) are never replaced by an HSU's.

``google.protobuf.descriptor_pb2`` (0.8 MiB of pure-Python descriptors) is
imported at the first question, not with the kernel: a deployment nobody
asks about never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest as Request
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionResponse as Response
from loguru import logger

from hsu._kernel.supervision.instances import Instance, InstanceState
from hsu.errors import HsuError

if TYPE_CHECKING:
    from google.protobuf import descriptor_pb2

    from hsu._kernel.kernel import Kernel
    from hsu.ports import Event

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
#: at most this many files, and bytes, from one instance
MAX_FILES = 512
MAX_BYTES = 16 * 2**20
#: seconds an instance gets to answer
ASK_TIMEOUT = 5.0
#: seconds a client waits for a unit to be started and asked (its deadline
#: when shorter)
LEARN_TIMEOUT = 60.0


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc.reflection.v1's file: v1alpha's under the v1 names (grpcio ships
    only v1alpha; the two differ in nothing else)."""
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fd)
    fd.name = "grpc/reflection/v1/reflection.proto"
    fd.package = "grpc.reflection.v1"
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for msg in fd.message_type:
        for field in msg.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for svc in fd.service:
        for m in svc.method:
            m.input_type = m.input_type.replace(old, new)
            m.output_type = m.output_type.replace(old, new)
    return fd


def _with_imports(pool: descriptor_pool.DescriptorPool, name: str) -> list[str]:
    """``name`` and every file it imports, transitively, ``name`` first."""
    seen: list[str] = []
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo.extend(d.name for d in pool.FindFileByName(current).dependencies)
    return seen


class Descriptors:
    """Every file the data plane describes, and how to learn more."""

    def __init__(self, kernel: Kernel, own_services: Iterable[str]):
        self._kernel = kernel
        self.own_services = tuple(own_services)
        #: serialized FileDescriptorProtos by file name
        self._files: dict[str, bytes] = {}
        self._own: set[str] = set()
        #: the pool of the files, made with the kernel's own at first use
        self._pool: descriptor_pool.DescriptorPool | None = None
        #: interface -> (unit, version) its files were learned from
        self.learned: dict[str, tuple[str, str]] = {}
        #: why an interface could not be learned (for the client's error)
        self._why: dict[str, str] = {}
        self._asking: dict[str, asyncio.Task[None]] = {}

    @property
    def pool(self) -> descriptor_pool.DescriptorPool:
        if self._pool is None:
            self._add_own_files()
            self._rebuild()
        assert self._pool is not None
        return self._pool

    def _add_own_files(self) -> None:
        from google.protobuf import descriptor_pb2

        default = descriptor_pool.Default()
        for service in self.own_services:
            if service == V1:
                self._add_own(_v1_file())
                continue
            for name in _with_imports(default, default.FindFileContainingSymbol(service).name):
                fd = descriptor_pb2.FileDescriptorProto()
                default.FindFileByName(name).CopyToProto(fd)
                self._add_own(fd)

    def _add_own(self, fd: descriptor_pb2.FileDescriptorProto) -> None:
        self._files[fd.name] = fd.SerializeToString()
        self._own.add(fd.name)

    # -- what is known -----------------------------------------------------------

    def services(self) -> list[str]:
        """The kernel's own services and every interface a unit serves: those
        the deployment declares and those its ready instances registered."""
        names = set(self.own_services)
        for spec in self._kernel.deployment.units.values():
            names.update(spec.interfaces)
        for inst in self._kernel.instances.values():
            if inst.state is InstanceState.READY:
                names.update(inst.interfaces)
        return sorted(names)

    def interfaces(self) -> list[str]:
        return [s for s in self.services() if s not in self.own_services]

    def file(self, name: str) -> list[bytes] | None:
        try:
            return [self._files[n] for n in _with_imports(self.pool, name)]
        except KeyError:
            return None

    def symbol(self, symbol: str) -> list[bytes] | None:
        """The file defining ``symbol`` (a service, method, message, field,
        enum or enum value), with its imports."""
        pool = self.pool
        try:
            return self.file(pool.FindFileContainingSymbol(symbol).name)
        except KeyError:
            pass
        # the pool finds top-level and nested types; a method, field or enum
        # value is found through its parent
        parent, _, child = symbol.rpartition(".")
        finders: tuple[tuple[Any, str], ...] = (
            (pool.FindServiceByName, "methods_by_name"),
            (pool.FindMessageTypeByName, "fields_by_name"),
            (pool.FindEnumTypeByName, "values_by_name"),
        )
        for find, members in finders:
            try:
                found = find(parent)
            except KeyError:
                continue
            if child in getattr(found, members):
                return self.file(found.file.name)
        return None

    def extension_numbers(self, message: str) -> list[int] | None:
        try:
            desc = self.pool.FindMessageTypeByName(message)
            return sorted(e.number for e in self.pool.FindAllExtensions(desc))
        except KeyError:
            return None

    def why(self, symbol: str) -> str:
        """Why ``symbol`` is not described, for the client's error."""
        reasons = [self._why[i] for i in self._candidates(symbol, every=True) if i in self._why]
        if reasons:
            return "; ".join(reasons)
        if not self._candidates(symbol, every=True):
            return f"{symbol!r} is not a service, method or type of any unit's interface"
        return f"no interface that could define {symbol!r} describes it"

    # -- learning ------------------------------------------------------------------

    def add(self, unit: str, protos: list[descriptor_pb2.FileDescriptorProto]) -> None:
        """An instance's files join the pool (the kernel's own are kept)."""
        _ = self.pool  # the kernel's own files first
        changed = False
        for fd in protos:
            if fd.name in self._own:
                continue
            raw = fd.SerializeToString()
            if self._files.get(fd.name) != raw:
                self._files[fd.name] = raw
                changed = True
        if changed:
            self._rebuild(unit)

    def _rebuild(self, unit: str = "") -> None:
        """A fresh pool from the files (a file cannot be replaced in a pool)."""
        from google.protobuf import descriptor_pb2

        pool = descriptor_pool.DescriptorPool()
        parse = descriptor_pb2.FileDescriptorProto.FromString
        protos = {n: parse(r) for n, r in self._files.items()}
        done: set[str] = set()

        def add(name: str, path: tuple[str, ...] = ()) -> bool:
            if name in done:
                return True
            fd = protos.get(name)
            if fd is None or name in path:
                return False
            if not all(add(dep, (*path, name)) for dep in fd.dependency):
                return False
            try:
                pool.Add(fd)
            except (TypeError, ValueError) as exc:
                logger.warning(
                    "reflection: file {!r}{} left out: {}",
                    name,
                    f" from unit {unit}" if unit else "",
                    exc,
                )
                return False
            done.add(name)
            return True

        for name in list(protos):
            if not add(name):
                self._files.pop(name, None)
        self._pool = pool

    def _candidates(self, symbol: str, every: bool = False) -> list[str]:
        """The interfaces that could define ``symbol``: the interface itself
        or one of its methods, else (a message or enum) those of its package."""
        interfaces = self.interfaces()
        own = [i for i in interfaces if symbol == i or symbol.startswith(f"{i}.")]
        if own:
            return own
        return [
            i
            for i in interfaces
            if symbol.startswith(f"{i.rpartition('.')[0]}.") and (every or i not in self.learned)
        ]

    async def learn_symbol(self, symbol: str, timeout: float) -> None:
        """Ask the units whose interfaces could define ``symbol`` (starting
        an instance where none is ready)."""
        candidates = self._candidates(symbol)
        if candidates:
            await asyncio.gather(
                *(self.learn(i, timeout, start=True) for i in candidates), return_exceptions=True
            )

    async def learn(self, interface: str, timeout: float, start: bool = False) -> None:
        task = self._asking.get(interface)
        if task is None:
            task = self._asking[interface] = asyncio.ensure_future(
                self._learn(interface, timeout, start)
            )
            task.add_done_callback(lambda _: self._asking.pop(interface, None))
        await asyncio.shield(task)

    async def _learn(self, interface: str, timeout: float, start: bool) -> None:
        inst = self._ready(interface)
        try:
            if inst is None:
                if not start:
                    return
                inst = await asyncio.wait_for(self._kernel.instance_for(interface), timeout)
            protos = await ask(inst.address, interface)
        except (HsuError, TimeoutError, grpc.aio.AioRpcError) as exc:
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self._why[interface] = (
                f"{interface}: {'its instance ' + inst.instance_id if inst else 'no instance'}"
                f" did not describe it: {why or type(exc).__name__}"
            )
            logger.info("reflection: {}", self._why[interface])
            return
        self.add(inst.unit, protos)
        self._why.pop(interface, None)
        self.learned[interface] = (inst.unit, inst.version)

    def _ready(self, interface: str) -> Instance | None:
        for inst in self._kernel.instances.values():
            if inst.state is InstanceState.READY and interface in inst.interfaces:
                return inst
        return None

    def on_event(self, event: Event) -> None:
        """An instance became ready: learn its interfaces, unless learned from
        the same unit and version already."""
        if event.kind != "instance" or event.to_state != InstanceState.READY.value:
            return
        inst = self._kernel.instances.get(event.instance_id)
        if inst is None:
            return
        for interface in inst.interfaces:
            if self.learned.get(interface) != (inst.unit, inst.version):
                with contextlib.suppress(RuntimeError):  # no running loop: the kernel stopped
                    asyncio.get_running_loop()
                    self._spawn(interface)

    def _spawn(self, interface: str) -> None:
        if interface not in self._asking:
            task = asyncio.ensure_future(self.learn(interface, ASK_TIMEOUT))
            task.add_done_callback(_quiet)

    async def close(self) -> None:
        tasks = list(self._asking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def ask(address: str, interface: str) -> list[descriptor_pb2.FileDescriptorProto]:
    """The files an instance's reflection gives for ``interface``, with every
    file they import (asked one by one when the server sent only the file)."""
    options = [("grpc.max_receive_message_length", MAX_BYTES)]
    from google.protobuf import descriptor_pb2

    got: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    size = 0
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        todo: list[Request] = [Request(file_containing_symbol=interface)]
        while todo:
            request = todo.pop()
            replies = stub.ServerReflectionInfo(iter([request]), timeout=ASK_TIMEOUT)
            async for reply in replies:
                if reply.HasField("error_response"):
                    raise HsuError(
                        f"{reply.error_response.error_message or 'not found'}"
                        f" ({request.file_containing_symbol or request.file_by_filename})"
                    )
                for raw in reply.file_descriptor_response.file_descriptor_proto:
                    size += len(raw)
                    fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    got.setdefault(fd.name, fd)
                break
            if len(got) > MAX_FILES or size > MAX_BYTES:
                raise HsuError(f"more than {MAX_FILES} files or {MAX_BYTES} bytes")
            asked = {r.file_by_filename for r in todo}
            for fd in list(got.values()):
                for dep in fd.dependency:
                    if dep not in got and dep not in asked:
                        asked.add(dep)
                        todo.append(Request(file_by_filename=dep))
    return list(got.values())


class ReflectionServicer:
    """Both reflection services over :class:`Descriptors`."""

    def __init__(self, descriptors: Descriptors):
        self.descriptors = descriptors

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        handler = grpc.stream_stream_rpc_method_handler(
            self.info,
            request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString,
        )
        return [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1, V1ALPHA)
        ]

    async def info(self, requests: AsyncIterator[Request], context: Any) -> AsyncIterator[Response]:
        async for request in requests:
            yield await self._answer(request, context)

    async def _answer(self, request: Request, context: Any) -> Response:
        d = self.descriptors
        which = request.WhichOneof("message_request")
        if which == "list_services":
            return Response(
                original_request=request,
                list_services_response=reflection_pb2.ListServiceResponse(
                    service=[reflection_pb2.ServiceResponse(name=n) for n in d.services()]
                ),
            )
        if which == "file_by_filename":
            files = d.file(request.file_by_filename)
            return self._files(request, files, f"no file {request.file_by_filename!r}")
        if which == "file_containing_symbol":
            symbol = request.file_containing_symbol
            files = d.symbol(symbol)
            if files is None:
                await d.learn_symbol(symbol, self._timeout(context))
                files = d.symbol(symbol)
            return self._files(request, files, f"symbol not found: {d.why(symbol)}")
        if which == "all_extension_numbers_of_type":
            message = request.all_extension_numbers_of_type
            numbers = d.extension_numbers(message)
            if numbers is None:
                await d.learn_symbol(message, self._timeout(context))
                numbers = d.extension_numbers(message)
            if numbers is None:
                return _error(request, grpc.StatusCode.NOT_FOUND, f"no type {message!r}")
            return Response(
                original_request=request,
                all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                    base_type_name=message, extension_number=numbers
                ),
            )
        if which == "file_containing_extension":
            ext = request.file_containing_extension
            files = None
            with contextlib.suppress(KeyError):
                desc = d.pool.FindMessageTypeByName(ext.containing_type)
                found = d.pool.FindExtensionByNumber(desc, ext.extension_number)
                files = d.file(found.file.name)  # type: ignore[attr-defined]
            return self._files(request, files, "no such extension")
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "empty request")

    @staticmethod
    def _timeout(context: Any) -> float:
        remaining = context.time_remaining()
        return LEARN_TIMEOUT if remaining is None else max(0.0, min(remaining, LEARN_TIMEOUT))

    @staticmethod
    def _files(request: Request, files: list[bytes] | None, missing: str) -> Response:
        if files is None:
            return _error(request, grpc.StatusCode.NOT_FOUND, missing)
        return Response(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=files
            ),
        )


def _error(request: Request, code: grpc.StatusCode, message: str) -> Response:
    return Response(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(
            error_code=code.value[0], error_message=message
        ),
    )


class ControlReflection:
    """grpcio's reflection (v1alpha) of the control plane's own services,
    imported at the first call: its module imports descriptor_pb2."""

    def __init__(self, services: Iterable[str]):
        self._services = tuple(services)
        self._servicer: Any = None

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[Request], context: Any
    ) -> AsyncIterator[Response]:
        if self._servicer is None:
            from grpc_reflection.v1alpha import reflection

            self._servicer = reflection.aio.ReflectionServicer(self._services)
        async for reply in self._servicer.ServerReflectionInfo(request_iterator, context):
            yield reply
