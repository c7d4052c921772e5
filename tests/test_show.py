"""Issue 6: receptive fields against hand computation, pictures that show what they claim."""
import runpy
from pathlib import Path

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn, show
from cnncompile.summary import receptive_fields

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def fields_of(path):
    spec = runpy.run_path(str(EXAMPLES / path))
    model = cc.compile(spec["net"], input_shape=spec["input_shape"], backend="numpy")
    fields = receptive_fields(model.tracer.graph)
    return model, {n.name: (fields[n.output].size, fields[n.output].jump, fields[n.output].start)
                   for n in model.tracer.graph.ops}


def test_lenet5_receptive_fields():
    _, f = fields_of("lenet5.py")
    # size_l = size + (k−1)·jump; jump_l = jump·s; start_l = start + ((k−1)/2 − p)·jump (pixel centres)
    assert f["0"] == (5, 1, 2.5) and f["2"] == (6, 2, 3.0)
    assert f["3"] == (14, 2, 7.0) and f["5"] == (16, 4, 8.0)


def test_alexnet_receptive_fields():
    model, f = fields_of("alexnet.py")
    assert f["0"] == (11, 4, 5.5)      # conv1 11×11/4
    assert f["2"] == (19, 8, 9.5)      # pool1 3×3/2
    assert f["3"] == (51, 8, 9.5)      # conv2 5×5 pad 2
    assert f["5"] == (67, 16, 17.5)    # pool2
    assert f["6"] == (99, 16, 17.5)    # conv3
    assert f["8"] == (131, 16, 17.5)   # conv4
    assert f["10"] == (163, 16, 17.5)  # conv5
    assert f["12"] == (195, 32, 33.5)  # pool5: the classic 195-pixel field
    text = model.summary()
    assert "195" in text and "total:" in text


def lenet_model():
    spec = runpy.run_path(str(EXAMPLES / "lenet5.py"))
    return cc.compile(spec["net"], input_shape=(1, 32, 32), loss=nn.CrossEntropyLoss(),
                      optimizer=cc.optim.SGD(lr=0.05), backend="numpy", seed=4)


def test_filter_grid_is_the_weights(tmp_path):
    model = lenet_model()
    grid = show.filter_grid(model)
    w = model.state_dict()["0.weight"]
    assert grid.shape == (6 * 6 - 1, 5, 1)  # six 5×5 tiles in one column, 1-pixel gaps
    for n in range(6):
        tile_ = grid[6 * n:6 * n + 5, :, 0]
        expected = (w[n, 0] - w[n, 0].min()) / (w[n, 0].max() - w[n, 0].min())
        np.testing.assert_allclose(tile_, expected, atol=1e-6)
    show.save_filters(model, tmp_path / "filters.png")
    import matplotlib.image
    png = matplotlib.image.imread(tmp_path / "filters.png")
    assert png.ndim == 3 and png.std() > 0.05


def test_top_patches_are_the_receptive_fields_of_the_strongest_activations(tmp_path):
    model = lenet_model()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (40, 1, 32, 32)).astype(np.float32)
    found = show.top_patches(model, "3", channel=2, images=images, top=5)
    activations = model.executable.run("predict", 40, {"input": images}, share=False)["3.out"][:, 2]
    assert found[0][0] == pytest.approx(float(activations.max()))
    assert [f[0] for f in found] == sorted([f[0] for f in found], reverse=True)
    for value, b, r, c, patch in found:
        assert value == pytest.approx(float(activations[b, r, c]))
        assert patch.shape == (1, 14, 14)  # conv2's receptive field: 14 pixels, jump 2
        np.testing.assert_array_equal(patch, images[b, :, 2 * r:2 * r + 14, 2 * c:2 * c + 14])
    show.save_patches(model, tmp_path / "patches.png", "3", 2, images, top=9)
    assert (tmp_path / "patches.png").stat().st_size > 1000


def test_curves_and_graph_pictures(tmp_path):
    model = lenet_model()
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((64, 1, 32, 32)).astype(np.float32), rng.integers(0, 10, 64)
    history = model.fit((x, y), epochs=2, batch_size=32, validation=(x[:16], y[:16]), verbose=False)
    assert history["epoch"] == [1, 2] and len(history["val_accuracy"]) == 2
    show.save_curves(model.history, tmp_path / "curves.png")
    dot = model.graph(tmp_path / "graph.png")
    assert dot.startswith("digraph") and '"0" -> "1"' in dot and "1×32×32" in dot
    for name in ("curves.png", "graph.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_draws_its_curves_every_epoch(tmp_path):
    model = lenet_model()
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((32, 1, 32, 32)).astype(np.float32), rng.integers(0, 10, 32)
    drawn = []

    class Watch(cc.callbacks.Callback):
        def on_epoch_end(self, model_, epoch, logs):
            drawn.append((tmp_path / "c.png").stat().st_mtime_ns)

    model.fit((x, y), epochs=2, batch_size=16, validation=(x, y), verbose=False,
              callbacks=[cc.callbacks.CurvesPNG(tmp_path / "c.png"), Watch()])
    assert len(drawn) == 2 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_show_writes_pictures(tmp_path):
    from cnncompile.cli import main
    main(["show", str(EXAMPLES / "lenet5.py"), "--backend", "numpy", "--filters", str(tmp_path / "f.png"),
          "--graph", str(tmp_path / "g.png")])
    assert (tmp_path / "f.png").exists() and (tmp_path / "g.png").exists()
