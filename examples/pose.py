"""Pose estimation as regression: the (x, y) of 7 joints of a stick figure (head, neck, hip,
hands, feet), 14 outputs trained with L2, as in the lecture's keypoint example.
Data: generated stick figures (cnncompile.training.data.synthetic.stick_figures).

    cnncompile train examples/pose.py
"""
import numpy as np

from cnncompile import nn, optim
from cnncompile.training.data import synthetic

net = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 2 * len(synthetic.JOINTS)),
)
input_shape = (1, 32, 32)
loss = nn.MSELoss()
optimizer = optim.Adam(lr=2e-3)
epochs = 6
batch_size = 64


def dataset():
    return synthetic.stick_figures(n=12000, seed=0)


def report(model, data):
    """Mean joint error in pixels and the share of joints within 2 px (PCK@2px) on the test split."""
    x, y = data["test"]
    size = input_shape[-1]
    error = np.hypot(*((model.predict(x) - y).reshape(len(x), -1, 2) * size).transpose(2, 0, 1))
    return {"mean joint error (px)": float(error.mean()), "PCK@2px": float((error < 2).mean())}
