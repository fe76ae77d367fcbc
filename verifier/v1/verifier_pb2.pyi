from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckRequest(_message.Message):
    __slots__ = ("method", "scheme", "host", "path", "headers", "client_address", "client_cert_thumbprint")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    method: str
    scheme: str
    host: str
    path: str
    headers: _containers.ScalarMap[str, str]
    client_address: str
    client_cert_thumbprint: str
    def __init__(self, method: _Optional[str] = ..., scheme: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., client_address: _Optional[str] = ..., client_cert_thumbprint: _Optional[str] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("allowed", "http_status", "upstream_headers", "response_headers", "reason", "subject", "roles", "body", "cache_max_age_seconds", "answer_headers")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_HEADERS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_HEADERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_HEADERS_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    http_status: int
    upstream_headers: _containers.RepeatedCompositeFieldContainer[Header]
    response_headers: _containers.RepeatedCompositeFieldContainer[Header]
    reason: str
    subject: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    body: str
    cache_max_age_seconds: int
    answer_headers: _containers.RepeatedCompositeFieldContainer[Header]
    def __init__(self, allowed: _Optional[bool] = ..., http_status: _Optional[int] = ..., upstream_headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., response_headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., reason: _Optional[str] = ..., subject: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., body: _Optional[str] = ..., cache_max_age_seconds: _Optional[int] = ..., answer_headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ...) -> None: ...
