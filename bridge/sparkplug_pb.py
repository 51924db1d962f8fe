"""Eclipse Tahu's Sparkplug B payload schema (`bridge/sparkplug_b.proto`, EPL-2.0), compiled.

The descriptor is the proto compiled once by protoc and kept here, so the product needs the
protobuf runtime only, no generated code and no protoc. It lives in a pool of its own, so a
process that also loads another copy of the same proto (an edge-node library) gets no
conflict. To compile it again after changing the proto:

    python -m grpc_tools.protoc -Ibridge --descriptor_set_out=/tmp/spb.desc \\
        bridge/sparkplug_b.proto
    # then base64 of FileDescriptorSet.FromString(...).file[0].SerializeToString()
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_DESCRIPTOR = base64.b64decode(
    "ChFzcGFya3BsdWdfYi5wcm90bxIZb3JnLmVjbGlwc2UudGFodS5wcm90b2J1ZiKHHAoHUGF5bG9hZBIcCgl0"
    "aW1lc3RhbXAYASABKARSCXRpbWVzdGFtcBJDCgdtZXRyaWNzGAIgAygLMikub3JnLmVjbGlwc2UudGFodS5w"
    "cm90b2J1Zi5QYXlsb2FkLk1ldHJpY1IHbWV0cmljcxIQCgNzZXEYAyABKARSA3NlcRISCgR1dWlkGAQgASgJ"
    "UgR1dWlkEhIKBGJvZHkYBSABKAxSBGJvZHkaxAUKCFRlbXBsYXRlEhgKB3ZlcnNpb24YASABKAlSB3ZlcnNp"
    "b24SQwoHbWV0cmljcxgCIAMoCzIpLm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5NZXRyaWNS"
    "B21ldHJpY3MSVQoKcGFyYW1ldGVycxgDIAMoCzI1Lm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9h"
    "ZC5UZW1wbGF0ZS5QYXJhbWV0ZXJSCnBhcmFtZXRlcnMSIQoMdGVtcGxhdGVfcmVmGAQgASgJUgt0ZW1wbGF0"
    "ZVJlZhIjCg1pc19kZWZpbml0aW9uGAUgASgIUgxpc0RlZmluaXRpb24arwMKCVBhcmFtZXRlchISCgRuYW1l"
    "GAEgASgJUgRuYW1lEhIKBHR5cGUYAiABKA1SBHR5cGUSHQoJaW50X3ZhbHVlGAMgASgNSABSCGludFZhbHVl"
    "Eh8KCmxvbmdfdmFsdWUYBCABKARIAFIJbG9uZ1ZhbHVlEiEKC2Zsb2F0X3ZhbHVlGAUgASgCSABSCmZsb2F0"
    "VmFsdWUSIwoMZG91YmxlX3ZhbHVlGAYgASgBSABSC2RvdWJsZVZhbHVlEiUKDWJvb2xlYW5fdmFsdWUYByAB"
    "KAhIAFIMYm9vbGVhblZhbHVlEiMKDHN0cmluZ192YWx1ZRgIIAEoCUgAUgtzdHJpbmdWYWx1ZRJ4Cg9leHRl"
    "bnNpb25fdmFsdWUYCSABKAsyTS5vcmcuZWNsaXBzZS50YWh1LnByb3RvYnVmLlBheWxvYWQuVGVtcGxhdGUu"
    "UGFyYW1ldGVyLlBhcmFtZXRlclZhbHVlRXh0ZW5zaW9uSABSDmV4dGVuc2lvblZhbHVlGiMKF1BhcmFtZXRl"
    "clZhbHVlRXh0ZW5zaW9uKggIARCAgICAAkIHCgV2YWx1ZSoICAYQgICAgAIangUKB0RhdGFTZXQSJAoObnVt"
    "X29mX2NvbHVtbnMYASABKARSDG51bU9mQ29sdW1ucxIYCgdjb2x1bW5zGAIgAygJUgdjb2x1bW5zEhQKBXR5"
    "cGVzGAMgAygNUgV0eXBlcxJCCgRyb3dzGAQgAygLMi4ub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXls"
    "b2FkLkRhdGFTZXQuUm93UgRyb3dzGogDCgxEYXRhU2V0VmFsdWUSHQoJaW50X3ZhbHVlGAEgASgNSABSCGlu"
    "dFZhbHVlEh8KCmxvbmdfdmFsdWUYAiABKARIAFIJbG9uZ1ZhbHVlEiEKC2Zsb2F0X3ZhbHVlGAMgASgCSABS"
    "CmZsb2F0VmFsdWUSIwoMZG91YmxlX3ZhbHVlGAQgASgBSABSC2RvdWJsZVZhbHVlEiUKDWJvb2xlYW5fdmFs"
    "dWUYBSABKAhIAFIMYm9vbGVhblZhbHVlEiMKDHN0cmluZ192YWx1ZRgGIAEoCUgAUgtzdHJpbmdWYWx1ZRJ4"
    "Cg9leHRlbnNpb25fdmFsdWUYByABKAsyTS5vcmcuZWNsaXBzZS50YWh1LnByb3RvYnVmLlBheWxvYWQuRGF0"
    "YVNldC5EYXRhU2V0VmFsdWUuRGF0YVNldFZhbHVlRXh0ZW5zaW9uSABSDmV4dGVuc2lvblZhbHVlGiEKFURh"
    "dGFTZXRWYWx1ZUV4dGVuc2lvbioICAEQgICAgAJCBwoFdmFsdWUaZAoDUm93ElMKCGVsZW1lbnRzGAEgAygL"
    "Mjcub3JnLmVjbGlwc2UudGFodS5wcm90b2J1Zi5QYXlsb2FkLkRhdGFTZXQuRGF0YVNldFZhbHVlUghlbGVt"
    "ZW50cyoICAIQgICAgAIqCAgFEICAgIACGvUECg1Qcm9wZXJ0eVZhbHVlEhIKBHR5cGUYASABKA1SBHR5cGUS"
    "FwoHaXNfbnVsbBgCIAEoCFIGaXNOdWxsEh0KCWludF92YWx1ZRgDIAEoDUgAUghpbnRWYWx1ZRIfCgpsb25n"
    "X3ZhbHVlGAQgASgESABSCWxvbmdWYWx1ZRIhCgtmbG9hdF92YWx1ZRgFIAEoAkgAUgpmbG9hdFZhbHVlEiMK"
    "DGRvdWJsZV92YWx1ZRgGIAEoAUgAUgtkb3VibGVWYWx1ZRIlCg1ib29sZWFuX3ZhbHVlGAcgASgISABSDGJv"
    "b2xlYW5WYWx1ZRIjCgxzdHJpbmdfdmFsdWUYCCABKAlIAFILc3RyaW5nVmFsdWUSXQoRcHJvcGVydHlzZXRf"
    "dmFsdWUYCSABKAsyLi5vcmcuZWNsaXBzZS50YWh1LnByb3RvYnVmLlBheWxvYWQuUHJvcGVydHlTZXRIAFIQ"
    "cHJvcGVydHlzZXRWYWx1ZRJjChJwcm9wZXJ0eXNldHNfdmFsdWUYCiABKAsyMi5vcmcuZWNsaXBzZS50YWh1"
    "LnByb3RvYnVmLlBheWxvYWQuUHJvcGVydHlTZXRMaXN0SABSEXByb3BlcnR5c2V0c1ZhbHVlEnIKD2V4dGVu"
    "c2lvbl92YWx1ZRgLIAEoCzJHLm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5Qcm9wZXJ0eVZh"
    "bHVlLlByb3BlcnR5VmFsdWVFeHRlbnNpb25IAFIOZXh0ZW5zaW9uVmFsdWUaIgoWUHJvcGVydHlWYWx1ZUV4"
    "dGVuc2lvbioICAEQgICAgAJCBwoFdmFsdWUadQoLUHJvcGVydHlTZXQSEgoEa2V5cxgBIAMoCVIEa2V5cxJI"
    "CgZ2YWx1ZXMYAiADKAsyMC5vcmcuZWNsaXBzZS50YWh1LnByb3RvYnVmLlBheWxvYWQuUHJvcGVydHlWYWx1"
    "ZVIGdmFsdWVzKggIAxCAgICAAhptCg9Qcm9wZXJ0eVNldExpc3QSUAoLcHJvcGVydHlzZXQYASADKAsyLi5v"
    "cmcuZWNsaXBzZS50YWh1LnByb3RvYnVmLlBheWxvYWQuUHJvcGVydHlTZXRSC3Byb3BlcnR5c2V0KggIAhCA"
    "gICAAhrvAQoITWV0YURhdGESIgoNaXNfbXVsdGlfcGFydBgBIAEoCFILaXNNdWx0aVBhcnQSIQoMY29udGVu"
    "dF90eXBlGAIgASgJUgtjb250ZW50VHlwZRISCgRzaXplGAMgASgEUgRzaXplEhAKA3NlcRgEIAEoBFIDc2Vx"
    "EhsKCWZpbGVfbmFtZRgFIAEoCVIIZmlsZU5hbWUSGwoJZmlsZV90eXBlGAYgASgJUghmaWxlVHlwZRIQCgNt"
    "ZDUYByABKAlSA21kNRIgCgtkZXNjcmlwdGlvbhgIIAEoCVILZGVzY3JpcHRpb24qCAgJEICAgIACGpwHCgZN"
    "ZXRyaWMSEgoEbmFtZRgBIAEoCVIEbmFtZRIUCgVhbGlhcxgCIAEoBFIFYWxpYXMSHAoJdGltZXN0YW1wGAMg"
    "ASgEUgl0aW1lc3RhbXASGgoIZGF0YXR5cGUYBCABKA1SCGRhdGF0eXBlEiMKDWlzX2hpc3RvcmljYWwYBSAB"
    "KAhSDGlzSGlzdG9yaWNhbBIhCgxpc190cmFuc2llbnQYBiABKAhSC2lzVHJhbnNpZW50EhcKB2lzX251bGwY"
    "ByABKAhSBmlzTnVsbBJHCghtZXRhZGF0YRgIIAEoCzIrLm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5"
    "bG9hZC5NZXRhRGF0YVIIbWV0YWRhdGESTgoKcHJvcGVydGllcxgJIAEoCzIuLm9yZy5lY2xpcHNlLnRhaHUu"
    "cHJvdG9idWYuUGF5bG9hZC5Qcm9wZXJ0eVNldFIKcHJvcGVydGllcxIdCglpbnRfdmFsdWUYCiABKA1IAFII"
    "aW50VmFsdWUSHwoKbG9uZ192YWx1ZRgLIAEoBEgAUglsb25nVmFsdWUSIQoLZmxvYXRfdmFsdWUYDCABKAJI"
    "AFIKZmxvYXRWYWx1ZRIjCgxkb3VibGVfdmFsdWUYDSABKAFIAFILZG91YmxlVmFsdWUSJQoNYm9vbGVhbl92"
    "YWx1ZRgOIAEoCEgAUgxib29sZWFuVmFsdWUSIwoMc3RyaW5nX3ZhbHVlGA8gASgJSABSC3N0cmluZ1ZhbHVl"
    "EiEKC2J5dGVzX3ZhbHVlGBAgASgMSABSCmJ5dGVzVmFsdWUSUQoNZGF0YXNldF92YWx1ZRgRIAEoCzIqLm9y"
    "Zy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5EYXRhU2V0SABSDGRhdGFzZXRWYWx1ZRJUCg50ZW1w"
    "bGF0ZV92YWx1ZRgSIAEoCzIrLm9yZy5lY2xpcHNlLnRhaHUucHJvdG9idWYuUGF5bG9hZC5UZW1wbGF0ZUgA"
    "Ug10ZW1wbGF0ZVZhbHVlEmkKD2V4dGVuc2lvbl92YWx1ZRgTIAEoCzI+Lm9yZy5lY2xpcHNlLnRhaHUucHJv"
    "dG9idWYuUGF5bG9hZC5NZXRyaWMuTWV0cmljVmFsdWVFeHRlbnNpb25IAFIOZXh0ZW5zaW9uVmFsdWUaIAoU"
    "TWV0cmljVmFsdWVFeHRlbnNpb24qCAgBEICAgIACQgcKBXZhbHVlKggIBhCAgICAAiryAwoIRGF0YVR5cGUS"
    "CwoHVW5rbm93bhAAEggKBEludDgQARIJCgVJbnQxNhACEgkKBUludDMyEAMSCQoFSW50NjQQBBIJCgVVSW50"
    "OBAFEgoKBlVJbnQxNhAGEgoKBlVJbnQzMhAHEgoKBlVJbnQ2NBAIEgkKBUZsb2F0EAkSCgoGRG91YmxlEAoS"
    "CwoHQm9vbGVhbhALEgoKBlN0cmluZxAMEgwKCERhdGVUaW1lEA0SCAoEVGV4dBAOEggKBFVVSUQQDxILCgdE"
    "YXRhU2V0EBASCQoFQnl0ZXMQERIICgRGaWxlEBISDAoIVGVtcGxhdGUQExIPCgtQcm9wZXJ0eVNldBAUEhMK"
    "D1Byb3BlcnR5U2V0TGlzdBAVEg0KCUludDhBcnJheRAWEg4KCkludDE2QXJyYXkQFxIOCgpJbnQzMkFycmF5"
    "EBgSDgoKSW50NjRBcnJheRAZEg4KClVJbnQ4QXJyYXkQGhIPCgtVSW50MTZBcnJheRAbEg8KC1VJbnQzMkFy"
    "cmF5EBwSDwoLVUludDY0QXJyYXkQHRIOCgpGbG9hdEFycmF5EB4SDwoLRG91YmxlQXJyYXkQHxIQCgxCb29s"
    "ZWFuQXJyYXkQIBIPCgtTdHJpbmdBcnJheRAhEhEKDURhdGVUaW1lQXJyYXkQIkIsChlvcmcuZWNsaXBzZS50"
    "YWh1LnByb3RvYnVmQg9TcGFya3BsdWdCUHJvdG8="
)
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(_DESCRIPTOR))
PACKAGE = "org.eclipse.tahu.protobuf"
# The generated class of the Payload message (fields as in the proto; Any for mypy).
Payload: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.Payload"))
DATA_TYPES: dict[int, str] = {
    number: value.name
    for number, value in _POOL.FindEnumTypeByName(f"{PACKAGE}.DataType").values_by_number.items()
}
