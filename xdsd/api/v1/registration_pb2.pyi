import datetime
from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import message as _message
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("service", "instance_id", "address", "port", "weight", "zone", "labels", "ttl")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: str | None = ..., value: str | None = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    service: str
    instance_id: str
    address: str
    port: int
    weight: int
    zone: str
    labels: _containers.ScalarMap[str, str]
    ttl: _duration_pb2.Duration
    def __init__(self, service: str | None = ..., instance_id: str | None = ..., address: str | None = ..., port: int | None = ..., weight: int | None = ..., zone: str | None = ..., labels: _Mapping[str, str] | None = ..., ttl: datetime.timedelta | _duration_pb2.Duration | _Mapping | None = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("service", "instance_id")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    service: str
    instance_id: str
    def __init__(self, service: str | None = ..., instance_id: str | None = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("service", "instance_id")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    service: str
    instance_id: str
    def __init__(self, service: str | None = ..., instance_id: str | None = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: str | None = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("service", "instance_id", "address", "port", "weight", "zone", "labels", "ttl", "state", "expires_at")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Instance.State]
        ACTIVE: _ClassVar[Instance.State]
        DRAINING: _ClassVar[Instance.State]
    STATE_UNSPECIFIED: Instance.State
    ACTIVE: Instance.State
    DRAINING: Instance.State
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: str | None = ..., value: str | None = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    service: str
    instance_id: str
    address: str
    port: int
    weight: int
    zone: str
    labels: _containers.ScalarMap[str, str]
    ttl: _duration_pb2.Duration
    state: Instance.State
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, service: str | None = ..., instance_id: str | None = ..., address: str | None = ..., port: int | None = ..., weight: int | None = ..., zone: str | None = ..., labels: _Mapping[str, str] | None = ..., ttl: datetime.timedelta | _duration_pb2.Duration | _Mapping | None = ..., state: Instance.State | str | None = ..., expires_at: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Iterable[Instance | _Mapping] | None = ...) -> None: ...
