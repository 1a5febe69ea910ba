"""Read OpenAI's DALL-E ``encoder.pkl`` and ``decoder.pkl`` without running their code.

OpenAI published the encoder and decoder as whole pickled ``nn.Module`` objects
(``torch.save(module)``), which the original code read with full unpickling: importing ``dall_e``
and executing whatever the file names. Here a file goes through ``torch.load(weights_only=True)``
(PyTorch's restricted unpickler: tensors, storages, parameters, plain containers) with a short
allow-list that maps the module classes such a file names (``dall_e.encoder.Encoder``,
``dall_e.encoder.EncoderBlock``, ``dall_e.utils.Conv2d`` and the torch containers/activations
used inside; ``dall_e.decoder.Decoder``, ``dall_e.decoder.DecoderBlock`` and ``nn.Upsample`` for
the decoder) onto inert :class:`PickledModuleRecord` objects. Nothing from ``dall_e`` or the file
is imported or called; the records only keep the pickled attribute dicts, from which the
hyper-parameters (``n_hid``, ``n_blk_per_group``, ``vocab_size``, ...) and the parameters (by
their dotted names) are read and loaded into mcbeit's :class:`DallEEncoder` / :class:`DallEDecoder`.
Any other global in the file is refused and named in the error.

Both of PyTorch's file formats are read: the zip format through ``torch.load(weights_only=True)``
with the allow-list above, and the legacy (non-zip, torch < 1.6 default) format, in which the
released files are stored, through :class:`_LegacyRestrictedUnpickler`: a
``pickle.Unpickler`` whose ``find_class`` only returns the inert records, ``OrderedDict``, storage
dtype markers and mcbeit's own tensor-rebuild functions, and whose ``persistent_load`` only
accepts module-source records (ignored; the source is never compiled) and storage records.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any, Dict, NamedTuple, Tuple

import torch

from mcbeit.models.checkpoint import compare_state_dict

from .dalle import DallEDecoder, DallEEncoder

#: The only non-torch-default globals a DALL-E encoder pickle may name.
DALLE_ENCODER_PICKLE_CLASSES: Tuple[str, ...] = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
)
#: The only non-torch-default globals a DALL-E decoder pickle may name.
DALLE_DECODER_PICKLE_CLASSES: Tuple[str, ...] = (
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)
_MAX_DEPTH = 16


class _PickleKind(NamedTuple):
    part: str  # "encoder" / "decoder"
    root_class: str
    classes: Tuple[str, ...]
    config_keys: Tuple[str, ...]


_ENCODER = _PickleKind(
    "encoder", "dall_e.encoder.Encoder", DALLE_ENCODER_PICKLE_CLASSES,
    ("group_count", "n_hid", "n_blk_per_group", "input_channels", "vocab_size"),
)
_DECODER = _PickleKind(
    "decoder", "dall_e.decoder.Decoder", DALLE_DECODER_PICKLE_CLASSES,
    ("group_count", "n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size"),
)


class PickledModuleRecord:
    """Inert stand-in for a pickled module: remembers its class name and attribute dict."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):  # never given anything meaningful; kept inert
        self.state: Dict[str, Any] = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, dict) else {"__state__": state}

    def __repr__(self) -> str:
        return f"<pickled {self.qualified_name}>"


def _record_globals(classes: Tuple[str, ...] = DALLE_ENCODER_PICKLE_CLASSES):
    entries = []
    for name in classes:
        short = name.rsplit(".", 1)[-1]
        record_cls = type(f"Pickled{short}", (PickledModuleRecord,), {"qualified_name": name, "__module__": __name__})
        entries.append((record_cls, name))
    return entries


def _state(record: PickledModuleRecord) -> Dict[str, Any]:
    # PickledModuleRecord.__new__ skips __init__, so .state exists only once BUILD ran
    return getattr(record, "state", {})


def _flatten(record: Any, prefix: str, out: "OrderedDict[str, torch.Tensor]", depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"DALL-E pickle: module tree deeper than {_MAX_DEPTH} at {prefix!r}")
    if not isinstance(record, PickledModuleRecord):
        raise ValueError(f"DALL-E pickle: expected a module at {prefix or '<root>'}, found {type(record).__name__}")
    state = _state(record)
    if record.qualified_name.endswith(".Upsample"):
        _check_upsample(state, prefix)
    for group in ("_parameters", "_buffers"):
        tensors = state.get(group) or {}
        if not isinstance(tensors, dict):
            raise ValueError(f"DALL-E pickle: {prefix}{group} is not a dict")
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"DALL-E pickle: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor.detach()
    children = state.get("_modules") or {}
    if not isinstance(children, dict):
        raise ValueError(f"DALL-E pickle: {prefix}_modules is not a dict")
    for name, child in children.items():
        if child is not None:
            _flatten(child, f"{prefix}{name}.", out, depth + 1)


def _check_upsample(state: Dict[str, Any], prefix: str) -> None:
    """mcbeit's decoder upsamples 2x nearest: refuse a pickled ``nn.Upsample`` that does otherwise."""
    mode, scale = state.get("mode", "nearest"), state.get("scale_factor")
    if mode != "nearest" or scale not in (2, 2.0, (2, 2), (2.0, 2.0)) or state.get("size") is not None:
        raise ValueError(
            f"DALL-E pickle: {prefix.rstrip('.') or '<root>'} upsamples with mode={mode!r}, scale_factor={scale!r}, "
            f"size={state.get('size')!r}; OpenAI's decoder uses nearest 2x"
        )


def _read_dalle_pickle(path, kind: _PickleKind) -> Tuple[Dict[str, int], "OrderedDict[str, torch.Tensor]"]:
    path = os.fspath(path)
    if not hasattr(torch.serialization, "safe_globals"):  # pragma: no cover - torch < 2.5
        raise RuntimeError(f"reading OpenAI's {kind.part}.pkl safely needs torch >= 2.5 (torch.serialization.safe_globals)")
    try:
        if zipfile.is_zipfile(path):
            with torch.serialization.safe_globals(_record_globals(kind.classes)):
                root = torch.load(path, map_location="cpu", weights_only=True)
        else:
            root = _load_legacy(path, _legacy_globals(kind.classes))
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a DALL-E {kind.part} pickle that mcbeit can read safely: it names a global outside the "
            f"allow-list {list(kind.classes)} (or is corrupt). mcbeit never unpickles arbitrary "
            f"objects. Details:\n{err}"
        ) from None
    if not isinstance(root, PickledModuleRecord) or root.qualified_name != kind.root_class:
        found = root.qualified_name if isinstance(root, PickledModuleRecord) else type(root).__name__
        raise ValueError(f"{path}: expected a pickled {kind.root_class} (OpenAI's {kind.part}.pkl), found {found}")
    state = _state(root)
    config: Dict[str, int] = {}
    for key in kind.config_keys:
        # OpenAI's Encoder and Decoder declare group_count as a plain class attribute (4), not an
        # attrs field, so it is absent from pickled instances
        value = state.get(key, 4 if key == "group_count" else None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: {kind.part} attribute {key!r} is {value!r}, expected a positive int")
        config[key] = value
    tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    _flatten(root, "", tensors)
    return config, tensors


def read_dalle_encoder_pickle(path) -> Tuple[Dict[str, int], "OrderedDict[str, torch.Tensor]"]:
    """``(config, state_dict)`` of OpenAI's ``encoder.pkl``, read with the restricted unpickler."""
    return _read_dalle_pickle(path, _ENCODER)


def read_dalle_decoder_pickle(path) -> Tuple[Dict[str, int], "OrderedDict[str, torch.Tensor]"]:
    """``(config, state_dict)`` of OpenAI's ``decoder.pkl``, read with the restricted unpickler."""
    return _read_dalle_pickle(path, _DECODER)


def load_dalle_encoder(path, image_size: int = 112) -> DallEEncoder:
    """mcbeit's :class:`DallEEncoder` holding the weights of OpenAI's ``encoder.pkl`` at ``path``."""
    config, state_dict = read_dalle_encoder_pickle(path)
    encoder = DallEEncoder(image_size=image_size, **config)
    report = compare_state_dict(encoder, state_dict)
    if report:
        raise ValueError(f"{os.fspath(path)}: parameters do not match a DALL-E encoder with {config}:\n{report.describe()}")
    encoder.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    encoder.random_weights = False
    return encoder


def load_dalle_decoder(path) -> DallEDecoder:
    """mcbeit's :class:`DallEDecoder` holding the weights of OpenAI's ``decoder.pkl`` at ``path`` (eval mode)."""
    config, state_dict = read_dalle_decoder_pickle(path)
    decoder = DallEDecoder(**config)
    report = compare_state_dict(decoder, state_dict)
    if report:
        raise ValueError(f"{os.fspath(path)}: parameters do not match a DALL-E decoder with {config}:\n{report.describe()}")
    decoder.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return decoder.eval()


# --------------------------------------------------------------------------- legacy format
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_MAX_STORAGE_NUMEL = 1 << 28  # the released encoder's largest tensor has 16.8 M elements
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    """Marker for a pickled storage class (``torch.FloatStorage`` ...): only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _LegacyStorage:
    """A storage of the legacy format: allocated while unpickling, filled from the file afterwards."""

    def __init__(self, dtype: torch.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.flat = torch.empty(numel, dtype=dtype)  # every byte is read from the file (or the load fails)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _LegacyStorage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    offset, size, stride = int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(st < 0 for st in stride) or offset < 0:
        raise pickle.UnpicklingError("tensor with an invalid size, stride or offset")
    if all(size) and offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) >= storage.numel:
        raise pickle.UnpicklingError("tensor view exceeds its storage")
    # a view on the storage's flat tensor: filled in place once the raw data is read
    return torch.as_strided(storage.flat, size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _device(*args):
    return ("device",) + tuple(str(a) for a in args)  # inert: the device is never used


def _legacy_globals(classes: Tuple[str, ...] = DALLE_ENCODER_PICKLE_CLASSES) -> Dict[Tuple[str, str], Any]:
    allowed: Dict[Tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        # protocol-2 pickles name builtins by their Python 2 module (``__builtin__``)
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,
    }
    for record_cls, name in _record_globals(classes):
        module, _, short = name.rpartition(".")
        allowed[(module, short)] = record_cls
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    allowed[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor
    allowed[("torch._utils", "_rebuild_tensor")] = _rebuild_tensor
    allowed[("torch._utils", "_rebuild_parameter")] = _rebuild_parameter
    allowed[("torch._utils", "_rebuild_parameter_with_state")] = _rebuild_parameter
    allowed[("torch", "device")] = _device
    return allowed


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler for the legacy header values and key lists: no globals at all."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed here")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed here")


class _LegacyRestrictedUnpickler(pickle.Unpickler):
    """Main pickle of a legacy file: allow-listed globals, storage and module-source records only."""

    def __init__(self, file, allowed: Dict[Tuple[str, str], Any]):
        super().__init__(file)
        self.allowed = allowed
        self.storages: Dict[str, _LegacyStorage] = {}

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not in the allow-list") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {type(pid).__name__}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module":
            # ('module', class, source_file, source): the class already went through find_class;
            # the saved source text is ignored (never compiled or compared).
            return pid[1]
        if typename == "storage":
            storage_type, root_key, _location, numel, view_metadata = pid[1:]
            if not isinstance(storage_type, _StorageType):
                raise pickle.UnpicklingError("storage record without an allowed storage type")
            if view_metadata is not None:
                raise pickle.UnpicklingError("storage views are not supported in DALL-E pickles")
            key = str(root_key)
            if not isinstance(numel, int) or not 0 <= numel <= _MAX_STORAGE_NUMEL:
                raise pickle.UnpicklingError(f"storage {key!r} claims {numel!r} elements (limit {_MAX_STORAGE_NUMEL})")
            if key not in self.storages:
                self.storages[key] = _LegacyStorage(storage_type.dtype, int(numel))
            return self.storages[key]
        raise pickle.UnpicklingError(f"unexpected persistent id type {typename!r}")


def _read_plain(f):
    return _PlainUnpickler(f).load()


def _load_legacy(path: str, allowed: Dict[Tuple[str, str], Any]) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _read_plain(f)
        except Exception as err:  # noqa: BLE001 - any failure means "not this format"
            raise pickle.UnpicklingError(f"not a PyTorch file (neither zip nor legacy format): {err}") from None
        if magic != _LEGACY_MAGIC_NUMBER:
            raise pickle.UnpicklingError("not a PyTorch legacy file (bad magic number)")
        version = _read_plain(f)
        if version != _LEGACY_PROTOCOL_VERSION:
            raise pickle.UnpicklingError(f"unsupported legacy protocol version {version!r}")
        _read_plain(f)  # sys_info: endianness and type sizes (little-endian is assumed below)
        unpickler = _LegacyRestrictedUnpickler(f, allowed)
        try:
            root = unpickler.load()
        except pickle.UnpicklingError:
            raise
        except Exception as err:  # noqa: BLE001 - malformed content: report, never execute more
            raise pickle.UnpicklingError(f"malformed legacy pickle: {type(err).__name__}: {err}") from None
        keys = _read_plain(f)
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("legacy file: storage key list missing")
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise pickle.UnpicklingError(f"legacy file: storage {key!r} is not referenced by the pickle")
            header = f.read(8)
            if len(header) != 8:
                raise pickle.UnpicklingError(f"legacy file: storage {key!r} is truncated")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise pickle.UnpicklingError(f"legacy file: storage {key!r} has {numel} elements, expected {storage.numel}")
            nbytes = numel * storage.flat.element_size()
            if nbytes and f.readinto(memoryview(storage.flat.view(torch.uint8).numpy())) != nbytes:  # in place
                raise pickle.UnpicklingError(f"legacy file: storage {key!r} is truncated")
    return root
