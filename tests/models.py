"""Small models shared by the tests."""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class WineClassifier(nn.Module):
    """The model of shared/seeds/004: functional ReLUs only, no activation modules."""

    def __init__(self, num_units: int = 20) -> None:
        super().__init__()
        self.dense0 = nn.Linear(13, num_units)
        self.dense1 = nn.Linear(num_units, 10)
        self.output = nn.Linear(10, 3)

    def forward(self, X):
        X = self.dense0(X)
        X = self.dense1(F.relu(X))
        X = self.output(F.relu(X))
        return X


def mlp(width: int = 64, depth: int = 2, act=nn.ReLU, d_in: int = 13, d_out: int = 3) -> nn.Sequential:
    layers: list = []
    d = d_in
    for i in range(depth):
        layers += [(f"fc{i}", nn.Linear(d, width)), (f"act{i}", act())]
        d = width
    layers.append(("head", nn.Linear(d, d_out)))
    return nn.Sequential(OrderedDict(layers))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class Encoder(nn.Module):
    """A small transformer encoder: embedding, a ModuleList of blocks (GELU FFN), a head."""

    def __init__(self, vocab: int = 50, d: int = 32, layers: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True) for _ in range(layers)]
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@dataclass
class Out:
    hidden: torch.Tensor
    extra: int = 0


class StructuredOutputs(nn.Module):
    """Blocks returning a tuple, a dict and a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        pair = (F.relu(self.b(h)), 3)
        d = {"h": torch.sigmoid(pair[0])}
        return Out(d["h"])
