"""kubelet's side of containerd's CRI image service: PullImage, ImageStatus, ListImages.

Owns the few messages of the CRI API (`runtime.v1`, k8s.io/cri-api's
api.proto) that kubelet sends to pull an image, encoded by hand from their
public field numbers (a protobuf message is a list of tagged fields: here
varints and length-delimited ones; fixed-width fields, which none of these
messages has, are skipped on reading), and a gRPC client that sends
them over a containerd socket as kubelet does: the same method paths, the
same request shape (the image, its credentials, the pod's sandbox config).
The codec is sans-IO and tested without a socket. It must not talk to any
socket but the one it is given (never the system containerd's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc

__all__ = [
    "CriError",
    "CriImage",
    "CriImageService",
    "PodMeta",
    "decode_fields",
    "decode_image",
    "decode_list_images_response",
    "decode_pull_image_response",
    "dial_image_service",
    "encode_image_status_request",
    "encode_list_images_request",
    "encode_pull_image_request",
    "open_image_service",
    "varint",
]

SERVICE = "/runtime.v1.ImageService/"
# Field numbers, from runtime/v1/api.proto.
PULL_IMAGE = {"image": 1, "auth": 2, "sandbox_config": 3}  # PullImageRequest
IMAGE_SPEC = {"image": 1}  # ImageSpec
AUTH_CONFIG = {"username": 1, "password": 2}  # AuthConfig
SANDBOX_CONFIG = {"metadata": 1, "labels": 6}  # PodSandboxConfig
SANDBOX_METADATA = {"name": 1, "uid": 2, "namespace": 3, "attempt": 4}  # PodSandboxMetadata
IMAGE = {"id": 1, "repo_tags": 2, "repo_digests": 3, "size": 4}  # Image
# PullImageResponse.image_ref, ImageStatusRequest/Response.image,
# ListImagesResponse.images: each field 1 of its message.
FIRST = 1

_VARINT, _LEN = 0, 2
_FIXED = {1: 8, 5: 4}  # fixed64/double, fixed32/float: none read here, but skipped
_MAX_VARINT_BYTES = 10


class CriError(RuntimeError):
    """A malformed message, or a call the daemon answered with an error."""


# -- codec ---------------------------------------------------------------------


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int below 2**64."""
    if not 0 <= n < 1 << 64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            break
        b = buf[pos + i]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos + i + 1
    raise CriError(f"truncated or overlong varint at byte {pos}")


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + varint(len(payload)) + payload


def _str_field(number: int, value: str) -> bytes:
    # proto3 leaves a default (empty) value off the wire.
    return _len_field(number, value.encode()) if value else b""


def _map_field(number: int, entries: Mapping[str, str]) -> bytes:
    """A `map<string, string>`: one entry message (key 1, value 2) per pair."""
    return b"".join(
        _len_field(number, _str_field(1, k) + _str_field(2, v)) for k, v in sorted(entries.items())
    )


def decode_fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """Every field of one message, by number, each number's values in wire order."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type in _FIXED or wire_type == _LEN:
            size = _FIXED.get(wire_type)
            if size is None:
                size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise CriError(f"field {number}: {size} bytes announced, {len(buf) - pos} left")
            value, pos = buf[pos : pos + size], pos + size
        else:  # groups (3, 4): deprecated, and in no CRI message
            raise CriError(f"field {number}: wire type {wire_type} is not protobuf 3")
        if number == 0:
            raise CriError("field number 0")
        fields.setdefault(number, []).append(value)
    return fields


def _strings(fields: dict[int, list[int | bytes]], number: int) -> list[str]:
    out = []
    for v in fields.get(number, []):
        if not isinstance(v, bytes):
            raise CriError(f"field {number}: a varint where a string belongs")
        out.append(v.decode())
    return out


def _one_message(fields: dict[int, list[int | bytes]], number: int) -> bytes | None:
    values = fields.get(number, [])
    if not values:
        return None
    last = values[-1]  # protobuf: the last occurrence of a singular field wins
    if not isinstance(last, bytes):
        raise CriError(f"field {number}: a varint where a message belongs")
    return last


@dataclass(frozen=True, slots=True)
class PodMeta:
    """The pod a pull is for: kubelet sends its sandbox config with every PullImage."""

    name: str = "p2preg-cri-test"
    namespace: str = "default"
    uid: str = "00000000-0000-4000-8000-000000000017"
    attempt: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        m = SANDBOX_METADATA
        metadata = (
            _str_field(m["name"], self.name)
            + _str_field(m["uid"], self.uid)
            + _str_field(m["namespace"], self.namespace)
            + (_key(m["attempt"], _VARINT) + varint(self.attempt) if self.attempt else b"")
        )
        return _len_field(SANDBOX_CONFIG["metadata"], metadata) + _map_field(
            SANDBOX_CONFIG["labels"], self.labels
        )


def _image_spec(ref: str) -> bytes:
    return _str_field(IMAGE_SPEC["image"], ref)


def encode_pull_image_request(
    ref: str, *, auth: tuple[str, str] | None = None, pod: PodMeta | None = None
) -> bytes:
    """PullImageRequest{image: ImageSpec{ref}, auth: AuthConfig{user, password}, sandbox_config}."""
    if not ref:
        raise ValueError("PullImage needs an image reference")
    out = _len_field(PULL_IMAGE["image"], _image_spec(ref))
    if auth is not None:
        user, password = auth
        creds = _str_field(AUTH_CONFIG["username"], user) + _str_field(
            AUTH_CONFIG["password"], password
        )
        out += _len_field(PULL_IMAGE["auth"], creds)
    if pod is not None:
        out += _len_field(PULL_IMAGE["sandbox_config"], pod.encode())
    return out


def encode_image_status_request(ref: str) -> bytes:
    """ImageStatusRequest{image: ImageSpec{ref}} (verbose off)."""
    return _len_field(FIRST, _image_spec(ref))


def encode_list_images_request() -> bytes:
    """ListImagesRequest with no filter: every image of the CRI namespace."""
    return b""


@dataclass(frozen=True, slots=True)
class CriImage:
    """The part of CRI's `Image` a test reads."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int

    @classmethod
    def decode(cls, buf: bytes) -> Self:
        f = decode_fields(buf)
        sizes = [v for v in f.get(IMAGE["size"], []) if isinstance(v, int)]
        ids = _strings(f, IMAGE["id"])
        return cls(
            id=ids[-1] if ids else "",
            repo_tags=tuple(_strings(f, IMAGE["repo_tags"])),
            repo_digests=tuple(_strings(f, IMAGE["repo_digests"])),
            size=sizes[-1] if sizes else 0,
        )


def decode_image(buf: bytes) -> CriImage | None:
    """ImageStatusResponse → its image; None when the daemon has no such image."""
    inner = _one_message(decode_fields(buf), FIRST)
    return None if inner is None else CriImage.decode(inner)


def decode_pull_image_response(buf: bytes) -> str:
    """PullImageResponse → image_ref (the image's id, a config digest)."""
    refs = _strings(decode_fields(buf), FIRST)
    if not refs:
        raise CriError("PullImage answered without an image_ref")
    return refs[-1]


def decode_list_images_response(buf: bytes) -> list[CriImage]:
    out = []
    for v in decode_fields(buf).get(FIRST, []):
        if not isinstance(v, bytes):
            raise CriError("ListImagesResponse: a varint where an Image belongs")
        out.append(CriImage.decode(v))
    return out


# -- the client ------------------------------------------------------------------


class CriImageService:
    """`/runtime.v1.ImageService` over one containerd socket (see `dial_image_service`)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def close(self) -> None:
        """Close the channel; a call in flight ends with CANCELLED (a `CriError`)."""
        self._channel.close()

    def _call(self, method: str, request: bytes, timeout_s: float) -> bytes:
        call = self._channel.unary_unary(
            SERVICE + method,
            request_serializer=bytes,
            response_deserializer=bytes,
        )
        try:
            reply = call(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise CriError(f"{method}: {e.code().name}: {e.details()}") from e
        if not isinstance(reply, bytes):
            raise CriError(f"{method}: not bytes from the channel: {type(reply).__name__}")
        return reply

    def pull_image(
        self,
        ref: str,
        *,
        auth: tuple[str, str] | None = None,
        pod: PodMeta | None = None,
        timeout_s: float = 300.0,
    ) -> str:
        """PullImage as kubelet sends it (with the pod's sandbox config); the image's id."""
        request = encode_pull_image_request(ref, auth=auth, pod=pod or PodMeta())
        return decode_pull_image_response(self._call("PullImage", request, timeout_s))

    def image_status(self, ref: str, *, timeout_s: float = 30.0) -> CriImage | None:
        """ImageStatus: what kubelet asks before it decides to pull."""
        return decode_image(self._call("ImageStatus", encode_image_status_request(ref), timeout_s))

    def list_images(self, *, timeout_s: float = 30.0) -> list[CriImage]:
        reply = self._call("ListImages", encode_list_images_request(), timeout_s)
        return decode_list_images_response(reply)


def dial_image_service(address: Path, *, timeout_s: float = 10.0) -> CriImageService:
    """A CRI image service client on the unix socket `address`, connected; close it."""
    # As kubelet dials it: no proxy, replies up to 16 MiB.
    channel = grpc.insecure_channel(
        "unix://" + os.fspath(address.absolute()),
        options=[("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 16 << 20)],
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError as e:
        channel.close()
        raise CriError(f"no CRI service on {address} within {timeout_s} s") from e
    return CriImageService(channel)


@contextmanager
def open_image_service(address: Path) -> Iterator[CriImageService]:
    """A CRI image service client on the unix socket `address`, closed on exit."""
    service = dial_image_service(address)
    try:
        yield service
    finally:
        service.close()
