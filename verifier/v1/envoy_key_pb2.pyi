from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckRequest(_message.Message):
    __slots__ = ("attributes",)
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    attributes: AttributeContext
    def __init__(self, attributes: _Optional[_Union[AttributeContext, _Mapping]] = ...) -> None: ...

class AttributeContext(_message.Message):
    __slots__ = ("source", "destination", "request", "context_extensions", "metadata_context", "tls_session", "route_metadata_context")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    METADATA_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TLS_SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_METADATA_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    source: _containers.RepeatedScalarFieldContainer[bytes]
    destination: _containers.RepeatedScalarFieldContainer[bytes]
    request: Request
    context_extensions: _containers.RepeatedScalarFieldContainer[bytes]
    metadata_context: _containers.RepeatedScalarFieldContainer[bytes]
    tls_session: _containers.RepeatedScalarFieldContainer[bytes]
    route_metadata_context: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, source: _Optional[_Iterable[bytes]] = ..., destination: _Optional[_Iterable[bytes]] = ..., request: _Optional[_Union[Request, _Mapping]] = ..., context_extensions: _Optional[_Iterable[bytes]] = ..., metadata_context: _Optional[_Iterable[bytes]] = ..., tls_session: _Optional[_Iterable[bytes]] = ..., route_metadata_context: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("http",)
    HTTP_FIELD_NUMBER: _ClassVar[int]
    http: HttpRequest
    def __init__(self, http: _Optional[_Union[HttpRequest, _Mapping]] = ...) -> None: ...

class HttpRequest(_message.Message):
    __slots__ = ("method", "headers", "path", "host", "scheme", "query", "fragment", "size", "protocol", "body", "raw_body", "header_map")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    RAW_BODY_FIELD_NUMBER: _ClassVar[int]
    HEADER_MAP_FIELD_NUMBER: _ClassVar[int]
    method: _containers.RepeatedScalarFieldContainer[bytes]
    headers: _containers.RepeatedScalarFieldContainer[bytes]
    path: _containers.RepeatedScalarFieldContainer[bytes]
    host: _containers.RepeatedScalarFieldContainer[bytes]
    scheme: _containers.RepeatedScalarFieldContainer[bytes]
    query: _containers.RepeatedScalarFieldContainer[bytes]
    fragment: _containers.RepeatedScalarFieldContainer[bytes]
    size: int
    protocol: _containers.RepeatedScalarFieldContainer[bytes]
    body: _containers.RepeatedScalarFieldContainer[bytes]
    raw_body: _containers.RepeatedScalarFieldContainer[bytes]
    header_map: HeaderMap
    def __init__(self, method: _Optional[_Iterable[bytes]] = ..., headers: _Optional[_Iterable[bytes]] = ..., path: _Optional[_Iterable[bytes]] = ..., host: _Optional[_Iterable[bytes]] = ..., scheme: _Optional[_Iterable[bytes]] = ..., query: _Optional[_Iterable[bytes]] = ..., fragment: _Optional[_Iterable[bytes]] = ..., size: _Optional[int] = ..., protocol: _Optional[_Iterable[bytes]] = ..., body: _Optional[_Iterable[bytes]] = ..., raw_body: _Optional[_Iterable[bytes]] = ..., header_map: _Optional[_Union[HeaderMap, _Mapping]] = ...) -> None: ...

class HeaderMap(_message.Message):
    __slots__ = ("headers",)
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    headers: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, headers: _Optional[_Iterable[bytes]] = ...) -> None: ...
