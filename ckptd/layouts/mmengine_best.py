"""MMEngine's own record of its best checkpoint, read from a training checkpoint.

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
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

from ckptd.layouts.peek import peek, top_mapping
from ckptd.model import Checkpoint, EvalRecord, TrainerBest
from ckptd.safepickle import Inert, top_level

# f'best_{key_indicator}_{filename_tmpl.format(step)}' with '/' replaced by '_'
BEST_NAME = re.compile(r"best_(.+)_(epoch|iter)_(\d+)\.pth", re.ASCII)
# The message hub is pickled whole; its bulk (numpy payloads) stays in the file when streamed.
MAX_HUB_PICKLE = 64 * 1024 * 1024
_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_FLOAT_CODES = {"f8": "d", "f4": "f", "f2": "e"}


def _number(value: Any) -> float | None:
    """A Python number, or a pickled numpy float scalar (metrics often return np.float64)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, Inert) or value.origin not in _NUMPY_SCALAR or len(value.args) < 2:
        return None
    dtype, raw = value.args[0], value.args[1]
    code = dtype.args[0] if isinstance(dtype, Inert) and dtype.args else None
    if code not in _FLOAT_CODES or not isinstance(raw, bytes):
        return None
    fmt = "<" + _FLOAT_CODES[code]
    return struct.unpack(fmt, raw)[0] if len(raw) == struct.calcsize(fmt) else None


def _runtime_best(root: Any) -> dict[str, tuple[str, float | None]]:
    """runtime-info suffix ('' or '_<key>') -> (best checkpoint file name, best score)."""
    hub = top_mapping(root).get("message_hub")
    if not isinstance(hub, dict):
        return {}
    info = top_level(hub.get("runtime_info"))
    if info is None:
        return {}
    found: dict[str, tuple[str, float | None]] = {}
    for name, value in info[0].items():
        if not isinstance(name, str) or not name.startswith("best_ckpt"):
            continue
        if not isinstance(value, str):
            continue
        suffix = name[len("best_ckpt") :]
        # An absolute path in the trainer's mount namespace: only the file name is trusted.
        found[suffix] = (value.replace("\\", "/").rsplit("/", 1)[-1], None)
        found[suffix] = (found[suffix][0], _number(info[0].get(f"best_score{suffix}")))
    return found


def _record_key(suffix: str, key_in_name: str, records: list[EvalRecord]) -> str | None:
    """The metric key as logged: from the runtime-info name (several keys), else from the file
    name, whose '/' MMEngine replaced by '_' (so matched against the logged keys)."""
    if suffix:
        return suffix[1:]
    logged = {k for r in records for k in r.metrics}
    matches = sorted(k for k in logged if k.replace("/", "_") == key_in_name)
    return matches[0] if len(matches) == 1 else None


def trainer_bests(
    work_dir: Path, checkpoints: list[Checkpoint], records: list[EvalRecord]
) -> list[TrainerBest]:
    """The best(s) recorded in the checkpoint the trainer wrote last; none without save_best."""
    complete = [c for c in checkpoints if c.complete]
    if not complete:
        return []
    # By mtime, not index: a run resumed from an earlier epoch leaves later files behind.
    newest = max(complete, key=lambda c: (c.stat.mtime_ns, c.index))
    path = work_dir / newest.name
    runtime = peek(path, "mmengine-best", MAX_HUB_PICKLE, _runtime_best, stream=True) or {}
    parsed = []
    for suffix, (file_name, score) in runtime.items():
        match = BEST_NAME.fullmatch(file_name)
        if match is None or match.group(2) != newest.unit:
            continue
        key = _record_key(suffix, match.group(1), records)
        if key is not None:
            parsed.append((key, int(match.group(3)), score, suffix))
    # Re-saved after validation N only when some best improved at N; else saved before it.
    as_of = newest.index if any(i == newest.index for _, i, _, _ in parsed) else newest.index - 1
    return [
        TrainerBest(key, index, score, as_of, f"{newest.name}: message_hub best_ckpt{suffix}")
        for key, index, score, suffix in parsed
    ]
