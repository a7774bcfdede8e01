"""Small float64 models and inputs shared by the routing and caching tests."""

import torch

from tdiff.config import ModelConfig, SharingConfig
from tdiff.model import build_model


def perturbed_net(depth=2, substeps=2, interleaved=True, seed=0, dtype=torch.float64):
    """A width-64, 16×16 model whose zero-initialised weights are filled with small noise.

    Zero-initialised branches would make every block an identity and hide every difference.
    """
    torch.manual_seed(seed)
    model = ModelConfig(image_size=16, width=64, head_dim=32, dropout=0.0, num_classes=10)
    net = build_model(model, SharingConfig(depth=depth, substeps=substeps, interleaved=interleaved)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return net


def net_inputs(n, seed=0):
    """(x (n, 3, 16, 16), c_noise (n,), labels (n,)) in float64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
            torch.randn(n, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))
