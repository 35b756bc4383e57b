"""What MMEngine's message hub, pickled into every training checkpoint, says of the run: the
hook's own best checkpoint, and the raw value of every evaluation.

``CheckpointHook(save_best=...)`` keeps ``best_score`` and ``best_ckpt`` (one key) or
``best_score_<key>`` and ``best_ckpt_<key>`` (several keys) in the message hub's runtime info,
which ``Runner.save_checkpoint`` pickles into every checkpoint under ``message_hub``. Read with
the restricted unpickler (``peek``), streamed, since the message hub also holds numpy arrays of
every logged scalar.

When a record covers which evaluations (mmengine 0.10.7, ``CheckpointHook`` and the train
loops): ``epoch_N.pth`` / ``iter_N.pth`` is written by ``after_train_epoch`` /
``after_train_iter``, *before* the train loop runs the validation of N. It is written again
after that validation only when a best improved there (``_save_best_checkpoint`` re-saves
``_save_checkpoint_with_step(runner, N)`` "to update the best_score and best_ckpt stored in
message_hub"). So the record accounts for evaluations up to N when some best names N, and up to
N - 1 otherwise.

The hub's ``log_scalars`` hold a ``HistoryBuffer`` per logged key (``val/<key>`` for validation
metrics, e.g. ``val/val/loss``) whose ``_log_history`` is every raw value of the run, resumed
runs included (the hub is restored). scalars.json has only running means of keys such as
``val/loss``, from which one NaN makes the raw values after it unrecoverable; the hub has them.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.core.model import Checkpoint, EvalRecord, TrainerBest
from ckptd.layouts.memo import Codec
from ckptd.layouts.peek import object_state, peek, top_mapping
from ckptd.slim.safepickle import Inert, top_level

# f'best_{key_indicator}_{filename_tmpl.format(step)}' with '/' replaced by '_'
BEST_NAME = re.compile(r"best_(.+)_(epoch|iter)_(\d+)\.pth", re.ASCII)
# The message hub is pickled whole; its bulk (numpy payloads) stays in the file when streamed.
MAX_HUB_PICKLE = 64 * 1024 * 1024
_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_NUMPY_RECONSTRUCT = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
_FLOAT_CODES = {"f8": "d", "f4": "f", "f2": "e"}


def _payload(value: Any) -> bytes | None:
    """bytes as pickled by protocol 2 (``_codecs.encode(text, 'latin1')``) or plainly."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, Inert) and value.origin == ("_codecs", "encode") and value.args:
        text = value.args[0]
        return text.encode("latin-1") if isinstance(text, str) else None
    return None


def _float_format(dtype: Any) -> str | None:
    """The struct format of a pickled float numpy dtype (``dtype('f8', False, True)`` then
    BUILD (3, byte order, ...)), or None for any other dtype."""
    code = dtype.args[0] if isinstance(dtype, Inert) and dtype.args else None
    if code not in _FLOAT_CODES:
        return None
    state = next((op[1] for op in dtype.ops or () if op[0] == "build"), None)
    order = state[1] if isinstance(state, tuple) and len(state) > 1 else "<"
    return (">" if order == ">" else "<") + _FLOAT_CODES[code]


def _float_array(array: Any) -> list[float] | None:
    """A pickled 1-d float numpy array (``_reconstruct`` then BUILD (1, shape, dtype, fortran,
    raw bytes)), or None for anything else."""
    if not isinstance(array, Inert) or array.origin not in _NUMPY_RECONSTRUCT:
        return None
    state = next((op[1] for op in array.ops or () if op[0] == "build"), None)
    if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[1], tuple):
        return None
    _, shape, dtype, _, raw = state
    fmt, raw = _float_format(dtype), _payload(raw)
    if fmt is None or raw is None or len(shape) != 1:
        return None
    if len(raw) != shape[0] * struct.calcsize(fmt):
        return None
    return [v for (v,) in struct.iter_unpack(fmt, raw)]


def _number(value: Any) -> float | None:
    """A Python number, or a pickled numpy float scalar (metrics often return np.float64)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, Inert) or value.origin not in _NUMPY_SCALAR or len(value.args) < 2:
        return None
    fmt, raw = _float_format(value.args[0]), _payload(value.args[1])
    if fmt is None or raw is None:
        return None
    return struct.unpack(fmt, raw)[0] if len(raw) == struct.calcsize(fmt) else None


@dataclass(frozen=True, slots=True)
class HubRecord:
    bests: dict[str, tuple[str, float | None]]  # suffix ('' or '_<key>') -> (file, score)
    raw: dict[str, list[float]]  # logged val key -> every raw value, in evaluation order


def _hub_part(hub: dict[Any, Any], name: str) -> dict[Any, Any]:
    found = top_level(hub.get(name))
    return found[0] if found else {}


def _read_hub(root: Any) -> HubRecord:
    hub = top_mapping(root).get("message_hub")
    if not isinstance(hub, dict):
        return HubRecord({}, {})
    raw: dict[str, list[float]] = {}
    for name, buffer in _hub_part(hub, "log_scalars").items():
        if isinstance(name, str) and name.startswith("val/"):
            values = _float_array(object_state(buffer).get("_log_history"))
            if values is not None:
                raw[name[len("val/") :]] = values
    return HubRecord(_runtime_best(_hub_part(hub, "runtime_info")), raw)


def _runtime_best(info: dict[Any, Any]) -> dict[str, tuple[str, float | None]]:
    """runtime-info suffix ('' or '_<key>') -> (best checkpoint file name, best score)."""
    found: dict[str, tuple[str, float | None]] = {}
    for name, value in info.items():
        if not isinstance(name, str) or not name.startswith("best_ckpt"):
            continue
        if not isinstance(value, str):
            continue
        suffix = name[len("best_ckpt") :]
        # An absolute path in the trainer's mount namespace: only the file name is trusted.
        file_name = value.replace("\\", "/").rsplit("/", 1)[-1]
        found[suffix] = (file_name, _number(info.get(f"best_score{suffix}")))
    return found


def _record_key(suffix: str, key_in_name: str, records: list[EvalRecord]) -> str | None:
    """The metric key as logged: from the runtime-info name (several keys), else from the file
    name, whose '/' MMEngine replaced by '_' (so matched against the logged keys)."""
    if suffix:
        return suffix[1:]
    logged = {k for r in records for k in r.metrics}
    matches = sorted(k for k in logged if k.replace("/", "_") == key_in_name)
    return matches[0] if len(matches) == 1 else None


def _hub_to_json(hub: HubRecord | None) -> Any:
    if hub is None:
        return None
    return {"bests": {k: list(v) for k, v in hub.bests.items()}, "raw": hub.raw}


def _hub_from_json(data: Any) -> HubRecord | None:
    if data is None:
        return None
    bests = {
        str(k): (str(name), None if score is None else float(score))
        for k, (name, score) in data["bests"].items()
    }
    raw = {str(k): [float(v) for v in values] for k, values in data["raw"].items()}
    return HubRecord(bests, raw)


HUB_CODEC: Codec[HubRecord | None] = Codec(_hub_to_json, _hub_from_json)


def read_hub(work_dir: Path, checkpoint: str) -> HubRecord | None:
    """The hub of one checkpoint, parsed once per file version; None if unreadable."""
    return peek(
        work_dir / checkpoint,
        "mmengine-hub",
        _read_hub,
        max_pickle=MAX_HUB_PICKLE,
        stream=True,
        codec=HUB_CODEC,
    )


def newest(checkpoints: list[Checkpoint]) -> Checkpoint | None:
    """The complete checkpoint written last. By mtime, not index: a run resumed from an earlier
    epoch leaves the later files of the abandoned run behind."""
    complete = [c for c in checkpoints if c.complete]
    return max(complete, key=lambda c: (c.stat.mtime_ns, c.index)) if complete else None


def trainer_bests(
    work_dir: Path, checkpoints: list[Checkpoint], records: list[EvalRecord]
) -> list[TrainerBest]:
    """The best(s) recorded in the checkpoint the trainer wrote last; none without save_best."""
    last = newest(checkpoints)
    hub = read_hub(work_dir, last.name) if last else None
    if last is None or hub is None:
        return []
    parsed = []
    for suffix, (file_name, score) in hub.bests.items():
        match = BEST_NAME.fullmatch(file_name)
        if match is None or match.group(2) != last.unit:
            continue
        key = _record_key(suffix, match.group(1), records)
        if key is not None:
            parsed.append((key, int(match.group(3)), score, suffix))
    # Re-saved after validation N only when some best improved at N; else saved before it.
    as_of = last.index if any(i == last.index for _, i, _, _ in parsed) else last.index - 1
    return [
        TrainerBest(key, index, score, as_of, f"{last.name}: message_hub best_ckpt{suffix}")
        for key, index, score, suffix in parsed
    ]
