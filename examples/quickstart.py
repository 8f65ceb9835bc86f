"""Train a small regression model with uba_fused.AdamW and the UBA schedule; log the lr it applied.

Run: make demo   (or: python examples/quickstart.py after `make setup`)
"""

import torch

import uba_fused as uf

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(4096, 32, device=device)
y = torch.sin(x @ torch.randn(32, 1, device=device))
model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)).to(device)

steps = 300
opt = uf.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01,
               schedule=uf.UBA(total_steps=steps, phi=1.0, warmup_steps=20))
print(f"uba_fused {uf.__version__}: AdamW on {device}, backend {opt.backends[0]!r}, "
      f"schedule {opt.defaults['schedule']}")
lr_log = opt.get_last_lr()[0]  # a device tensor, updated in place by every step: no sync until read
for t in range(steps):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if t % 50 == 0 or t == steps - 1:
        print(f"step {t:4d}  loss {loss.item():.5f}  lr {lr_log.item():.2e}")
