"""A real, tiny Hugging Face ``Trainer`` run on CPU, for conformance tests.

Everything that touches the output_dir is the ``Trainer``'s own code; only the model (a tiny
BERT built from a config, nothing downloaded), the data and the metric values are ours. The
model really trains; ``compute_metrics`` returns values from lookup tables indexed by the
evaluation's ordinal, so the metric rises and falls deterministically with no ties.

By default ``save_strategy='epoch'``, ``eval_strategy='epoch'``, no ``save_total_limit``: the
Trainer keeps every ``checkpoint-N/`` and ckptd decides. Options change those (``--strategy
steps --eval-steps 2 --save-steps 4``, ``--load-best``, ``--save-total-limit``); ``--values``
gives the metric's value per optimizer step (``values[global_step - 1]``, wrapping), so that a
resumed run evaluates what an uninterrupted one would. The result JSON lists every evaluation
(step, metrics) of ``log_history`` and every step the Trainer saved, for tests to compute their
own oracle. ``metric_for_best_model`` makes the Trainer record
its own ``best_model_checkpoint`` in ``trainer_state.json``, which the tests compare with
ckptd's choice.

    python tests/trainers/hf_real.py OUTPUT_DIR --epochs 5 --metric accuracy --result r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Strict maximum of accuracy at evaluation 2 (epoch 3), strict minimum of "score_loss" at
# evaluation 3 (epoch 4); no ties, so the Trainer's strict comparison has one answer.
ACCURACY = (0.50, 0.61, 0.74, 0.66, 0.70, 0.64, 0.69, 0.60)
SCORE_LOSS = (0.90, 0.71, 0.75, 0.55, 0.62, 0.58, 0.60, 0.66)
TRAIN_SIZE = 32
BATCH = 8  # 4 optimizer steps per epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the work_dir ckptd manages")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--metric", default="accuracy", help="metric_for_best_model")
    parser.add_argument("--greater-is-better", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--resume", action="store_true", help="resume_from_checkpoint=True")
    parser.add_argument("--strategy", choices=("epoch", "steps"), default="epoch")
    parser.add_argument("--eval-steps", type=int, default=None)
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--load-best", action="store_true", help="load_best_model_at_end=True")
    parser.add_argument("--save-total-limit", type=int, default=None)
    parser.add_argument(
        "--values", default=None, help="comma-separated value of --metric per step ('nan' ok)"
    )
    parser.add_argument("--result", required=True, help="JSON summary written here")
    args = parser.parse_args(argv)

    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(3)
    started = time.monotonic()

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (TRAIN_SIZE, 8), generator=g)
    labels = (ids[:, 0] > 20).long()

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return TRAIN_SIZE

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {
                "input_ids": ids[i],
                "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": labels[i],
            }

    evaluations = [0]
    per_step = [float(v) for v in args.values.split(",")] if args.values else None
    saved: list[int] = []

    def compute_metrics(_prediction) -> dict[str, float]:
        n = evaluations[0] % len(ACCURACY)
        evaluations[0] += 1
        found = {"accuracy": ACCURACY[n], "score_loss": SCORE_LOSS[n]}
        if per_step:
            step = trainer.state.global_step  # the closure reads it at evaluation time
            found[args.metric] = per_step[(step - 1) % len(per_step)]
        return found

    class RecordSaves(TrainerCallback):
        def on_save(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            saved.append(state.global_step)

    greater = {"auto": None, "true": True, "false": False}[args.greater_is_better]
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=1e-3,
        save_strategy=args.strategy,
        eval_strategy=args.strategy,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps or 500,
        load_best_model_at_end=args.load_best,
        save_total_limit=args.save_total_limit,
        logging_steps=2,
        metric_for_best_model=args.metric,
        greater_is_better=greater,
        report_to="none",
        use_cpu=True,
        seed=3,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Data(),
        eval_dataset=Data(),
        compute_metrics=compute_metrics,
        callbacks=[RecordSaves()],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    result = {
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "global_step": trainer.state.global_step,
        "best_global_step": trainer.state.best_global_step,
        "evaluations": [
            [e["step"], {k: v for k, v in e.items() if k.startswith("eval_")}]
            for e in trainer.state.log_history
            if any(k.startswith("eval_") for k in e)
        ],
        "saved": saved,
        "seconds": time.monotonic() - started,
    }
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
