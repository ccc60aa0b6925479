"""
A Hugging Face Trainer with RdiagCallback
=========================================

:class:`~rdiag.integrations.hf.RdiagCallback` is a ``TrainerCallback`` around
:class:`rdiag.Monitor`. The probe is a collated batch with ``labels`` (or a
dataset); for a causal language model the labels are shifted for you, as the
model shifts them inside when called with ``labels=``. The records go to the
Trainer's log (``trainer.state.log_history``, and from there to every
``report_to`` integration), the Monitor's state into each checkpoint.

Here a small GPT-2 (built from a config, no download) learns a synthetic
language, a fixed random successor for every token, so its loss falls fast; the
callback tracks how far its eNTK moves and how the preconditioned sharpness
(AdamW's second-moment preconditioner) evolves.
"""

# %%
import tempfile

import matplotlib.pyplot as plt
import torch
import transformers

from rdiag.integrations.hf import RdiagCallback

V, T, N = 64, 8, 256
gen = torch.Generator().manual_seed(0)
successor = torch.randperm(V, generator=gen)
ids = torch.empty(N, T, dtype=torch.long)
ids[:, 0] = torch.randint(V, (N,), generator=gen)
for t in range(1, T):
    ids[:, t] = successor[ids[:, t - 1]]
examples = [
    {"input_ids": row, "attention_mask": torch.ones(T, dtype=torch.long), "labels": row}
    for row in ids
]

torch.manual_seed(0)
config = transformers.GPT2Config(
    vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2,
    bos_token_id=0, eos_token_id=0, attn_implementation="eager",
)
model = transformers.GPT2LMHeadModel(config)

# %%
# The callback: the eNTK (its movement, spectrum, alignment), the sharpness and
# the probe loss every 10 steps; ``budget_fraction=None`` measures at every
# scheduled step (the default keeps diagnostics under 10% of training time, which
# on a model this small would skip most checks).
probe = transformers.default_data_collator(examples[:8])
callback = RdiagCallback(
    probe, every=10, budget_fraction=None,
    metrics=["ntk", "sharpness", "loss"],
)
args = transformers.TrainingArguments(
    output_dir=tempfile.mkdtemp(), max_steps=40, per_device_train_batch_size=16,
    learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=5,
    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
)
trainer = transformers.Trainer(
    model=model, args=args, train_dataset=examples,
    data_collator=transformers.default_data_collator, callbacks=[callback],
)
trainer.train()
print(callback.monitor.cost())

# %%
# The Trainer's log holds the rdiag records next to its own ``loss``.
logged = [h for h in trainer.state.log_history if "ntk/rel_change" in h]
print(sorted(k for k in logged[-1] if "/" in k)[:12], "...")

fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
trainer_loss = [h for h in trainer.state.log_history if "learning_rate" in h]  # its own logs
axes[0].plot([h["step"] for h in trainer_loss], [h["loss"] for h in trainer_loss], "o-")
axes[0].set(xlabel="step", ylabel="training loss (Trainer)", yscale="log")
steps = [h["step"] for h in logged]
axes[1].plot(steps, [h["ntk/rel_change"] for h in logged], "o-")
axes[1].set(xlabel="step", ylabel=r"$\|K_t - K_0\|_F / \|K_0\|_F$", title="eNTK movement")
axes[2].plot(steps, [h.get("sharpness/raw") for h in logged], "o-", label="raw $\\lambda_{\\max}(H)$")
axes[2].set(xlabel="step", title="sharpness")
axes[2].legend()
fig.tight_layout()
