"""
A Lightning fit with RdiagMonitor and TensorBoard
=================================================

:class:`~rdiag.integrations.lightning.RdiagMonitor` is a Lightning ``Callback``
around :class:`rdiag.Monitor`: it checks at initialization and every ``every``
optimizer steps on a fixed probe batch, logs through the trainer's loggers (here
TensorBoard), keeps its cost under ``budget_fraction`` of training time, measures
on rank zero only and carries its state in Lightning's checkpoints.

Three lines add it to an existing fit. Below, a small classifier on a synthetic
task; the records are then read back from the TensorBoard event file, as
TensorBoard itself would show them.
"""

# %%
import tempfile

import lightning.pytorch as L
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from rdiag.integrations.lightning import RdiagMonitor


class Classifier(L.LightningModule):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(10, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, 3),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


gen = torch.Generator().manual_seed(0)
x = torch.randn(512, 10, generator=gen)
y = (x[:, :3] + 0.3 * torch.randn(512, 3, generator=gen)).argmax(1)  # 3 classes
loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)
probe = (x[:48], y[:48])  # a small fixed batch: inputs and targets

# %%
# The callback: every 10 steps, the eNTK (its movement, top eigenvalues,
# alignment with the labels), representation and weight movement, the sharpness
# and the probe loss. ``budget_fraction=None`` measures at every scheduled step
# (the default, 10%, would thin the schedule on a model this small).
log_dir = tempfile.mkdtemp()
monitor = RdiagMonitor(probe, every=10, loss_fn=F.cross_entropy, budget_fraction=None)
trainer = L.Trainer(
    max_epochs=4, accelerator="cpu", callbacks=[monitor],
    logger=TensorBoardLogger(log_dir, name="rdiag"), enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
)
torch.manual_seed(0)
trainer.fit(Classifier(), loader)

print({k: round(v, 4) for k, v in monitor.history[-1].items() if "/" in k and "ntk" in k})

# %%
# The records as TensorBoard has them (``tensorboard --logdir`` on ``log_dir``
# shows the same curves).
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(trainer.logger.log_dir)
events.Reload()
tags = events.Tags()["scalars"]
print(len(tags), "scalar tags, e.g.", sorted(t for t in tags if t.startswith("ntk"))[:6])

fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
for ax, tag, title in zip(
    axes,
    ["ntk/rel_change", "ntk/kta", "sharpness/raw"],
    ["kernel movement from init", "kernel-label alignment", "sharpness"],
):
    if tag in tags:
        scalars = events.Scalars(tag)
        ax.plot([e.step for e in scalars], [e.value for e in scalars], "o-")
    ax.set(xlabel="optimizer step", title=title)
fig.tight_layout()
