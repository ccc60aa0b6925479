"""
Edge of stability: sharpness tracked at every step
==================================================

Full-batch gradient descent at learning rate :math:`\\eta` first *sharpens*: the
top Hessian eigenvalue :math:`\\lambda_{\\max}` rises until it reaches
:math:`2/\\eta`, the edge of stability, beyond which a quadratic model of the loss
diverges along the top eigenvector. The loss then spikes, the sharpness falls back
below :math:`2/\\eta` and training goes on (Cohen et al., 2021, "Gradient descent
on neural networks typically occurs at the edge of stability"). With per-layer
learning rates (μP) the quantity to compare with :math:`2/\\eta_0` is the
*preconditioned* sharpness :math:`\\lambda_{\\max}(M^{1/2} H M^{1/2})`,
:math:`M = \\eta_l/\\eta_0` (Noci et al., 2024; :doc:`/theory`).

:class:`rdiag.Monitor` with ``every=1`` measures it after each step. Each check
is a Lanczos run warm-started from the previous top eigenvector, so tracking costs
a handful of Hessian-vector products per step (recorded as
``sharpness/precond_matvecs``).
"""

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import rdiag

torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
x = torch.randn(64, 8, generator=gen)
teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
with torch.no_grad():
    y = 2 * teacher(x)

# %%
# Two widths of a μP MLP, trained by full-batch GD at the same base rate
# :math:`\eta_0`; the Monitor records the preconditioned sharpness and the loss at
# every step.
lr, steps = 0.5, 40
param = rdiag.parse_parametrization("mup")
curves = {}
for width in (64, 256):
    model = rdiag.make_model("mlp", width, d_in=8, d_out=1, parametrization=param, seed=0)
    opt = rdiag.make_optimizer(model, param, lr=lr)
    monitor = rdiag.Monitor(
        model,
        (x, y),
        every=1,
        metrics=["sharpness_precond", "loss"],
        loss_fn=F.mse_loss,
        lr_multipliers=rdiag.lr_multipliers(model, param),
        budget_fraction=None,
    )
    for step in range(steps + 1):
        monitor.step(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    curves[width] = monitor.history
    last = monitor.history[-1]
    print(
        f"width {width}: sharpness {last['sharpness/precond']:.3f} at step {steps} "
        f"(2/eta0 = {2 / lr:.3f}); {monitor.cost()}"
    )

# %%
# At both widths the preconditioned sharpness rises past :math:`2/\eta_0`; the
# loss then spikes and the sharpness drops back below the line (the edge of
# stability's self-stabilization), after which the loss falls again. The wider
# network sharpens sooner here: at 40 steps and widths 64 and 256 the curves are
# not yet the width-independent ones of the μP limit.
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
for width, history in curves.items():
    s = [h["step"] for h in history]
    ax1.plot(s, [h["sharpness/precond"] for h in history], label=f"width {width}")
    ax2.semilogy(s, [h["loss"] for h in history], label=f"width {width}")
ax1.axhline(2 / lr, color="k", ls="--", lw=1, label=r"$2/\eta_0$")
ax1.set(xlabel="step", ylabel=r"$\lambda_{\max}(M^{1/2} H M^{1/2})$", title="sharpness")
ax2.set(xlabel="step", ylabel="training loss", title="loss")
ax1.legend()
ax2.legend()
fig.tight_layout()

# %%
# Products per check: the first check starts Lanczos from a random vector, every
# later one from the previous eigenvector.
matvecs = [h["sharpness/precond_matvecs"] for h in curves[256]]
print("Hessian-vector products per check:", matvecs[:3], "...", matvecs[-3:])
