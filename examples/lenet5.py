"""LeNet-5 as in the lecture: 6 5×5 filters, 2×2 max pool, 16 5×5 filters, 2×2 max pool, 120, 84, 10,
on MNIST padded to 32×32.

    cnncompile train examples/lenet5.py
"""
from cnncompile import callbacks as cb
from cnncompile import nn, optim

net = nn.Sequential(
    nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
    nn.Linear(120, 84), nn.ReLU(),
    nn.Linear(84, 10),
)
input_shape = (1, 32, 32)
loss = nn.CrossEntropyLoss()
optimizer = optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4)
dataset = "mnist"
callbacks = [cb.StepLR(step_size=5, gamma=0.2)]  # lr 0.05 → 0.01 → 0.002
epochs = 12
batch_size = 64
