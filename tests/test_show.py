"""Receptive fields against hand computation; pictures that show what they claim: labelled and
scaled filter grids, curves over whole epochs with every head's loss, the graph IR laid out in
layers with every input of a join drawn (Graphviz where installed, matplotlib otherwise)."""
import runpy
from pathlib import Path

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from cnncompile.training import pictures as show
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
    grid3 = show.filter_grid(model, "3")  # rows: output channels n, columns: input channels m
    w3 = model.state_dict()["3.weight"]
    assert grid3.shape == (16 * 6 - 1, 6 * 6 - 1, 1)
    n, m = 11, 4
    tile_ = grid3[6 * n:6 * n + 5, 6 * m:6 * m + 5, 0]
    np.testing.assert_allclose(tile_, (w3[n, m] - w3[n, m].min()) / np.ptp(w3[n, m]), atol=1e-6)


def test_filter_picture_is_labelled_and_big_enough_to_see(tmp_path, monkeypatch):
    model = lenet_model()
    drawn = {}
    real = show.save_image
    monkeypatch.setattr(show, "save_image", lambda array, path, title="", **kw: (drawn.update(kw), real(array, path,
                                                                                                          title, **kw)))
    show.save_filters(model, tmp_path / "filters.png", "3")
    assert drawn["labels"] == ("output channel n", "input channel m")
    assert [label for _, label in drawn["rows"]] == list(range(16))
    assert [label for _, label in drawn["columns"]] == list(range(6))
    assert drawn["rows"][1][0] == 6 + 2 and drawn["columns"][4][0] == 4 * 6 + 2  # tile centres
    import matplotlib.image
    png = matplotlib.image.imread(tmp_path / "filters.png")
    assert png.shape[0] >= 16 * 5 * 8 and png.shape[1] >= 6 * 5 * 8  # ≥ 8 screen pixels per weight
    show.save_filters(model, tmp_path / "first.png")
    first = matplotlib.image.imread(tmp_path / "first.png")
    assert first.shape[0] >= 6 * 5 * 16 and first.std() > 0.05  # a 5×5 filter: ≥ 80 pixels a side
    with pytest.raises(KeyError, match=r"no convolution named '7'; the convolutions are \['0', '3'\]"):
        show.save_filters(model, tmp_path / "x.png", "7")


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
    assert dot.startswith("digraph") and '"0" -> "1"' in dot and "N×1×32×32" in dot
    for name in ("curves.png", "graph.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_show_whole_epochs_and_every_heads_loss():
    history = {"epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "cls_loss": [1.0, 0.8, 0.7], "box_loss": [0.2, 0.1, 0.08],
               "accuracy": [0.3, 0.5, 0.6], "val_loss": [3.1, 2.2, 1.7], "val_cls_loss": [1.1, 0.9, 0.8],
               "val_box_loss": [0.2, 0.13, 0.09], "val_accuracy": [0.3, 0.4, 0.5], "lr": [0.1] * 3,
               "seconds": [1.0] * 3}
    assert show.curve_panels(history) == ["loss", "cls_loss", "box_loss", "accuracy"]
    fig = show.curves_figure(history)
    try:
        for ax in fig.axes:
            low, high = ax.get_xlim()
            shown = [t for t in ax.get_xticks() if low <= t <= high]
            assert shown == [1, 2, 3], shown  # whole epochs only
            assert [len(line.get_xdata()) for line in ax.get_lines()] == [3, 3]  # training and validation
        assert list(fig.axes[2].get_lines()[1].get_ydata()) == history["val_box_loss"]
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


class Joins(nn.Module):
    """A stem, a residual add and a three-way concatenation: joins with several inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        s = self.stem(x)
        a = self.a(s)
        r = nn.functional.relu(self.b(a) + s)
        c = self.c(r)
        return self.fc(cc.cat([s, r, c], 1).flatten(1))


def joins_model():
    return cc.compile(Joins(), (1, 8, 8), loss=nn.CrossEntropyLoss(), backend="numpy")


def test_the_graph_is_read_from_the_graph_ir_with_every_input_of_a_join():
    model = joins_model()
    og = show.op_graph(model.tracer.graph)
    into = {n: [s for s, d, _ in og.edges if d == n] for n in og.nodes}
    add = next(n for n in og.nodes if og.kind[n] == "add")
    cat = next(n for n in og.nodes if og.kind[n] == "cat")
    assert into[add] == ["b", "stem"]
    assert into[cat][0] == "stem" and into[cat][2] == "c" and og.kind[into[cat][1]] == "relu"
    assert into["loss"] == ["fc", "target"] and og.kind["target"] == "input"
    assert og.label["stem"] == ["stem", "Conv2d 2×8×8, 20 params"]
    dot = show.graph_dot(model)
    assert sum(line.strip().endswith(f'-> "{cat}";') for line in dot.splitlines()) == 3
    import inspect
    assert "DiGraph(" not in inspect.getsource(show)  # no second graph: the IR's own networkx graph


def test_layered_layout_puts_producers_above_and_skip_edges_beside_the_boxes():
    og = show.op_graph(joins_model().tracer.graph)
    pos = show.layered_layout(og)
    assert len(set(pos.values())) == len(pos)  # no two boxes in one place
    assert all(pos[d][1] > pos[s][1] for s, d, _ in og.edges)  # every edge points down
    lanes = show.side_lanes(og, pos)
    skips = {(s, d) for s, d, _ in og.edges if pos[d][1] - pos[s][1] > 1}
    assert skips and set(lanes) == skips  # the residual's and the concatenation's long inputs
    for (s, d), (column, _) in lanes.items():
        passed = [c for n, (c, r) in pos.items() if pos[s][1] <= r <= pos[d][1]]
        assert column >= max(passed)  # the lane runs right of every box it passes
    for e, o in ((e, o) for e in lanes for o in lanes if e != o):
        if pos[e[0]][1] < pos[o[1]][1] and pos[o[0]][1] < pos[e[1]][1]:  # spans overlap: lanes apart
            assert lanes[e][1] != lanes[o][1], (e, o)


@pytest.mark.parametrize("drawer", ["matplotlib", "dot"])
def test_graph_png_is_readable(drawer, tmp_path, monkeypatch):
    if drawer == "matplotlib":
        monkeypatch.setattr(show, "dot_program", lambda: None)
    elif show.dot_program() is None:
        pytest.skip("Graphviz's dot is not installed here (the matplotlib drawing is tested)")
    model = joins_model()
    assert show.save_graph(model, tmp_path / "g.png") == drawer
    import matplotlib.image
    png = matplotlib.image.imread(tmp_path / "g.png")
    ranks = max(show.ranks(show.op_graph(model.tracer.graph)).values()) + 1
    assert png.shape[0] >= 40 * ranks  # room for two lines of text per rank
    assert png.shape[1] >= 250 and png.std() > 0.05


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


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())
        self.cls = nn.Linear(72, 3)
        self.box = nn.Linear(72, 4)

    def forward(self, x):
        h = self.trunk(x)
        return {"cls": self.cls(h), "box": self.box(h)}


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_fit_logs_every_heads_loss_and_the_curves_draw_them(backend, tmp_path):
    model = cc.compile(TwoHeads(), (1, 8, 8), loss={"cls": nn.CrossEntropyLoss(), "box": nn.MSELoss()},
                       loss_weights={"cls": 1.0, "box": 10.0}, optimizer=cc.optim.SGD(lr=0.05), backend=backend)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 1, 8, 8)).astype(np.float32)
    y = {"cls": rng.integers(0, 3, 24), "box": rng.uniform(0, 1, (24, 4)).astype(np.float32)}
    history = model.fit((x, y), epochs=2, batch_size=8, validation=(x, y), verbose=False)
    for key in ("cls_loss", "box_loss", "val_cls_loss", "val_box_loss"):
        assert len(history[key]) == 2, key
    for prefix in ("", "val_"):  # the total is the weighted sum of the heads' losses
        np.testing.assert_allclose(history[prefix + "loss"], np.add(history[prefix + "cls_loss"],
                                                                    10 * np.array(history[prefix + "box_loss"])),
                                   rtol=1e-5)
    metrics = model.evaluate(x, y)
    assert metrics["cls_loss"] == pytest.approx(history["val_cls_loss"][-1], rel=1e-6)  # nothing trained since
    assert metrics["loss"] == pytest.approx(metrics["cls_loss"] + 10 * metrics["box_loss"], rel=1e-5)
    assert show.curve_panels(history) == ["loss", "cls_loss", "box_loss", "accuracy"]
    show.save_curves(history, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_graph_too_deep_for_one_png_is_drawn_smaller(tmp_path, monkeypatch):
    monkeypatch.setattr(show, "MAX_PIXELS", 400)
    show.draw_layered(show.op_graph(joins_model().tracer.graph), tmp_path / "g.png")
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "g.png").shape[0] <= 400


def test_a_failing_dot_falls_back_to_the_matplotlib_drawing(tmp_path, monkeypatch):
    monkeypatch.setattr(show, "dot_program", lambda: "false")  # the `false` program: exits 1
    assert show.save_graph(joins_model(), tmp_path / "g.png") == "matplotlib"
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
