"""A small MLP raw network for vector data (the 2-D Gaussian-mixture toy and tests).

Same call protocol as the UNet: ``forward(x, noise_labels, class_labels=None)``.
"""

from __future__ import annotations

from torch import nn

from .unet import timestep_embedding


class MLP(nn.Module):
    """Residual MLP with a sinusoidal noise embedding added to every block."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 dropout: float = 0.0, num_classes: int | None = None,
                 noise_scale: float = 1.0 / 250.0):
        super().__init__()
        self.emb_dim = emb_dim
        # c_noise = 250 ln(sigma) spans about [-1550, 1100]; scaling it to ln(sigma) keeps the
        # sinusoidal embedding's frequencies meaningful for such a small network.
        self.noise_scale = noise_scale
        self.emb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout),
                          nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.emb(timestep_embedding(noise_labels * self.noise_scale, self.emb_dim,
                                          max_period=100.0).to(x.dtype))
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: pass class_labels")
            emb = emb + self.label_emb(class_labels)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)
