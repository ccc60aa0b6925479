"""RdiagCallback in real Hugging Face Trainers on GPT-2 and BERT built from small configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from rdiag.integrations.hf import STATE_FILE, RdiagCallback  # noqa: E402
from rdiag.losses import shift_labels  # noqa: E402
from rdiag.monitor import Monitor  # noqa: E402
from tests._assert import assert_same_records  # noqa: E402

VOCAB, T, N = 48, 8, 16
METRICS = ["ntk", "representations", "weights", "sharpness", "loss"]


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=T,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=T,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def _examples(labels: str) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(VOCAB, (N, T), generator=g)
    out = []
    for i, row in enumerate(ids):
        label = row.clone() if labels == "tokens" else torch.tensor(i % 3)
        out.append(
            {
                "input_ids": row,
                "attention_mask": torch.ones(T, dtype=torch.long),
                "labels": label,
            }
        )
    return out


def _args(tmp_path, steps: int, **kw):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.TrainingArguments(**{**defaults, **kw})


class DirectMonitor(transformers.TrainerCallback):
    """A plain Monitor called at the same steps on the same model: the reference.

    It is built with the Trainer's (AdamW) optimizer, which preconditions the
    sharpness, as the callback's Monitor is.
    """

    def __init__(self, model, probe, **options) -> None:
        self.args = (model, probe, options)
        self.monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        model, probe, options = self.args
        self.monitor = Monitor(model, probe, optimizer=kwargs["optimizer"], **options)
        self.monitor.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.monitor.step(state.global_step)


def _same(expected: list[dict], actual: list[dict]) -> None:
    assert_same_records(expected, actual, rtol=1e-5, atol=1e-6)


def _train(model, examples, callbacks, args):
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=transformers.default_data_collator,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_gpt2_records_equal_a_direct_monitor_with_shifted_targets(tmp_path) -> None:
    examples = _examples("tokens")
    batch = transformers.default_data_collator(examples[:6])
    cb = RdiagCallback(batch, every=2, budget_fraction=None, metrics=METRICS)
    model = _gpt2()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    direct = DirectMonitor(
        model,
        (inputs, shift_labels(batch["labels"])),
        every=2,
        metrics=METRICS,
        loss_fn=F.cross_entropy,
    )
    trainer = _train(model, examples, [cb, direct], _args(tmp_path, 4))
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    _same(direct.monitor.history, cb.history)
    assert "sharpness/precond" in cb.history[-1]  # Adam's preconditioner
    out = model(**inputs)
    model.eval()
    with torch.no_grad():
        own = model(**batch).loss  # the model shifts its labels itself
    assert cb.history[-1]["loss"] == pytest.approx(float(own), rel=1e-5)
    logged = [e for e in trainer.state.log_history if "ntk/rel_change" in e]
    assert [e["step"] for e in logged] == [0, 2, 4]
    assert cb.cost.checks == 3 and out.logits.shape == (6, T, VOCAB)


def test_bert_with_a_dataset_probe_and_the_trainers_collator(tmp_path) -> None:
    examples = _examples("classes")
    cb = RdiagCallback(examples[:6], every=2, budget_fraction=None, metrics=METRICS)
    model = _bert()
    batch = transformers.default_data_collator(examples[:6])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    direct = DirectMonitor(
        model,
        (inputs, batch["labels"]),
        every=2,
        metrics=METRICS,
        loss_fn=F.cross_entropy,
    )
    _train(model, examples, [cb, direct], _args(tmp_path, 2))
    _same(direct.monitor.history, cb.history)
    assert cb.history[-1]["ntk/rel_change"] > 0


def test_resume_from_a_checkpoint_measures_from_the_original_initialization(
    tmp_path,
) -> None:
    examples = _examples("tokens")
    batch = transformers.default_data_collator(examples[:6])
    options = dict(every=1, budget_fraction=None, metrics=["ntk", "representations"])
    full = RdiagCallback(batch, **options)
    _train(_gpt2(), examples, [full], _args(tmp_path / "full", 4))
    first = RdiagCallback(batch, **options)
    saving = _args(tmp_path / "run", 2, save_strategy="steps", save_steps=2)
    _train(_gpt2(), examples, [first], saving)
    assert (tmp_path / "run" / "checkpoint-2" / STATE_FILE).is_file()
    resumed = RdiagCallback(batch, **options)
    trainer = transformers.Trainer(
        model=_gpt2(),
        args=_args(tmp_path / "run", 4),
        train_dataset=examples,
        data_collator=transformers.default_data_collator,
        callbacks=[resumed],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _same(full.history, resumed.history)
    assert resumed.history[-1]["ntk/rel_change"] > 0


def test_a_probe_that_does_not_fit_names_its_shapes(tmp_path) -> None:
    examples = _examples("tokens")
    long = {"input_ids": torch.randint(VOCAB, (4, 3 * T))}
    cb = RdiagCallback(long, metrics=["ntk"])
    with pytest.raises(ValueError, match=r"'input_ids': \(4, 24\)"):
        _train(_gpt2(), examples, [cb], _args(tmp_path, 1))
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        RdiagCallback()


def test_default_budget_says_its_schedule_up_front_and_skips_nothing_silently(
    tmp_path,
) -> None:
    """every=10 over 40 steps with the default budget (issue 23's every=100 over
    400, scaled): each scheduled check after the first runs, or the callback said
    which schedule it uses before the first one it left out, and lists it."""
    import warnings

    examples = _examples("tokens")
    cb = RdiagCallback(transformers.default_data_collator(examples[:6]), every=10)
    said: dict[int, int] = {}

    class Watch(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            said[state.global_step] = sum(
                "rdiag: a check costs" in str(w.message) for w in caught
            )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(_gpt2(), examples, [cb, Watch()], _args(tmp_path, 40))
    mon = cb.monitor
    ran = [h["step"] for h in cb.history]
    assert sorted(ran + mon.skipped_steps) == [0, 10, 20, 30, 40]
    assert mon.skipped == len(mon.skipped_steps)
    if mon.skipped_steps:
        assert said[mon.skipped_steps[0]] == 1  # said once, before the first skip
        stride = mon.budget_plan.stride
        assert ran == [
            s for s in (0, 10, 20, 30, 40) if s <= 10 or (s // 10) % stride == 0
        ]
    assert said[40] <= 1
    assert 10 in ran  # the second check measures a later check's cost
    assert "monitor/check_steps" in cb.history[1] and cb.cost.per_check
