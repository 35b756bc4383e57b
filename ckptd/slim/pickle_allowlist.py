"""Globals a slim artifact may reference: a subset of what torch 2.13's ``weights_only`` loader
accepts by default (``torch._weights_only_unpickler._get_allowed_globals``).

Kept as data so the daemon never imports torch; ``tests/unit/test_safepickle.py`` checks that every
entry is still accepted by the installed torch. Left out on purpose: the legacy typed tensor
classes (``torch.FloatTensor``, ``torch.cuda.*Tensor``, ``torch.sparse.*Tensor``),
``torch.storage.TypedStorage`` and ``torch._utils._rebuild_device_tensor_from_numpy`` (its
arguments are numpy arrays, which are not allowed anyway).
"""

from __future__ import annotations

_DTYPES = (
    "bfloat16", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool",
    "complex128", "complex32", "complex64",
    "float16", "float32", "float64", "float4_e2m1fn_x2",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "int1", "int2", "int3", "int4", "int5", "int6", "int7", "int8", "int16", "int32", "int64",
    "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "uint8",
    "uint16", "uint32", "uint64",
    "qint8", "qint32", "quint8", "quint4x2", "quint2x4",
)  # fmt: skip

_QSCHEMES = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)

_REBUILD_FUNCTIONS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_nested_tensor",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_cpu_tensor",
)

# Legacy storage class name prefix -> element size in bytes. torch.save names a tensor's storage
# by one of these (or torch.storage.UntypedStorage, 1 byte, for the newer dtypes); the record
# data/<key> holds numel * element size bytes.
_STORAGE_ELEMENT_SIZES = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
    "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8,
    "QUInt8": 1, "QInt8": 1, "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1,
}  # fmt: skip

STORAGE_TYPES: dict[tuple[str, str], int] = {
    **{("torch", f"{kind}Storage"): size for kind, size in _STORAGE_ELEMENT_SIZES.items()},
    **{
        ("torch.cuda", f"{kind}Storage"): size
        for kind, size in _STORAGE_ELEMENT_SIZES.items()
        if not kind.startswith("Q")
    },
    ("torch.storage", "UntypedStorage"): 1,
}

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("collections", "Counter"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "Size"),
        ("torch", "Tensor"),
        ("torch", "device"),
        ("torch.serialization", "_get_layout"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
        ("builtins", "set"),
        ("builtins", "complex"),
        *(("torch._utils", name) for name in _REBUILD_FUNCTIONS),
        *(("torch", name) for name in _DTYPES),
        *(("torch", name) for name in _QSCHEMES),
        *STORAGE_TYPES,
    }
)

# Read-only: globals a DeepSpeed ``*_model_states.pt`` / ``*_optim_states.pt`` may name (its
# loss scaler, ZeRO stage enum and bf16 fragment map, and the trainers' client states that ride
# in the model-states file), on top of ``ALLOWED_GLOBALS``. ckptd never calls them: a shard
# naming anything else is refused before any of it is used (``slim/deepspeed.py``).
DEEPSPEED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    }
)

# Globals a torch distributed checkpoint's ``.metadata`` may reference (torch 2.4-2.13's
# ``torch.distributed.checkpoint.metadata`` dataclasses, pickled by ``FileSystemWriter.finish``).
# Separate from ``ALLOWED_GLOBALS``: none of these may appear in an artifact, and the artifact's
# tensor rebuild functions have no business in a ``.metadata``. ``slim/dcp_metadata.py`` reads
# the records as inert values and never builds any of them; ``pathlib.PosixPath`` is
# ``StorageMeta.checkpoint_id``, which is ignored.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            (_DCP_METADATA, name)
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint.metadata", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        *(("torch", name) for name in _DTYPES),
    }
)
