"""Does channels-last change the training maths? One backward pass of the 224 teacher's image
encoder: contiguous vs channels-last, and contiguous on 1 vs 2 threads (fp noise baseline).
Run from the repository root: `HF_HUB_OFFLINE=1 python reports/experiments/full-224-ema/channels_last_check.py`."""
import copy
from dataclasses import replace

import torch

from models.reward_model import TEACHER, RewardModel

torch.manual_seed(0)
torch.set_num_threads(1)
model = RewardModel(replace(TEACHER, image_size=224)).train()
channels_last = copy.deepcopy(model)
channels_last.image_encoder.to(memory_format=torch.channels_last)
image = torch.randn(4, 1, 224, 224)


def gradients(m):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)                        # the same drop-connect masks
    (m.image_encoder(image) ** 2).mean().backward()
    return torch.cat([p.grad.flatten() for p in m.image_encoder.parameters() if p.grad is not None])


def relative(a, b):
    return float((a - b).norm() / a.norm())


base = gradients(model)
print(f"contiguous vs channels-last, 1 thread: relative gradient difference {relative(base, gradients(channels_last)):.1e}")
torch.set_num_threads(2)
print(f"contiguous, 1 vs 2 threads:            relative gradient difference {relative(base, gradients(model)):.1e}")
