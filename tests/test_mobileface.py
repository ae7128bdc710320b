"""Tests of MobileFace: the TF.js interpreter's ops against direct references, the real graph
against TF.js itself, the chip geometry, and identity on real photos."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from agecgan import mobileface
from agecgan.align import DEFAULT_FRAMING, LEGACY_FRAMING, template_pixels
from agecgan.mobileface import (
    ARCFACE_TEMPLATE,
    SAME_PERSON_THRESHOLD,
    GraphError,
    MobileFaceMissingError,
    MobileFaceRecognizer,
    TFGraph,
    conv2d,
    cosine,
    depthwise_conv2d,
    matmul,
    pad,
    photo_chip,
    read_weights,
    spatial_padding,
)

needs_weights = pytest.mark.skipif(
    bool(mobileface.missing_files()),
    reason=f"MobileFace is not installed: run {mobileface.INSTALL_HINT}",
)

# TF.js itself (@tensorflow/tfjs 4.22.0, its CPU backend, in node: tests/tfjs_reference.js) ran
# models/mobileface.json on the astronaut's face as sliced below (pixels as float32, 0..255): its
# output, all 256 values rounded to 4 decimals. The interpreter matched it to 2.4e-5 (largest
# value 15.4); on random pixels it matched the nodes conv1, add_4, add_16 and flatten exactly and
# the output to 1.4e-5.
TFJS_TEXT = """
  -0.2463   5.7399  -4.7302   3.8920   2.4889 -10.8376   1.1185   1.2253  -6.6760   1.6681   7.9672
 -8.7364  -1.1633  -5.5985   2.0097  -7.2841  10.0304   1.8081  -0.5866   5.4414   7.6930   3.5599
 -2.9415  -4.5462   0.3943  -3.1225  -8.6884  -1.3399  -3.2573   9.8183  -4.1893   5.2549  -1.6396
 9.1293   5.5661  -9.1604   1.2813   6.9845  -9.2072  -0.4798   3.7501   6.3572  -4.4812   5.1127
 1.4036   4.2260   3.1800   3.7860  -2.6991   0.1471  -4.3823  -1.5208  -2.7980   1.5470   0.4249
 6.9305  -0.7663  -7.6759 -14.9008   2.1823   7.8133  -1.4864  -1.7455   0.0629  -2.9532   2.0013
 10.5680   3.3356  -4.5400  -0.4583   1.6452   8.3368  -3.8899  -7.0643   0.6239  -1.4139  -4.7718
 -3.0814   4.4443 -10.2002   8.2352   0.5465  -0.4006   3.9661   4.1801  -0.0777   3.9606  -4.4575
 -1.5482  -3.7146   4.9387   8.6926  -2.6079  -2.3035   2.1824   5.7001   6.1230  -4.7215  -6.2055
 -2.8816   3.3700   2.0288   4.4566  -0.3898  -6.2445   1.3717  -2.1446   0.4014  11.7929 -10.1582
 -3.4758   0.1100  -4.2786  -3.0212   3.5198   1.0254   3.7800   5.1084   2.4595  -2.6472  -8.2074
 -5.7871   8.1782   6.1494   4.9747   0.2626   3.4192  -2.6822  -2.3757  -5.8462   9.0142   0.6152
 4.9092   5.2897   3.1822  -4.0794  -1.6311  -3.7423   4.4889   5.3039  -5.9743   4.9647  -1.4605
 2.4813  -3.7570  -5.2827   6.7352  -2.9124  -3.4441  11.0341   8.4510   6.2111   2.9869  -8.5886
 0.0361 -11.8861   4.1041   5.4408   0.3507   6.9794  -1.7065   4.5035  -7.2600   1.3301   8.9719
 8.2152   7.2683   2.2820  -0.5802   0.9123   9.8966   6.0824   1.2867  -0.8796  -1.5588  -8.7795
 9.3185  -3.5874   7.4550  -2.0582   3.4380  -2.6708   4.6438   3.5395   1.3210   8.3956  -4.6188
 2.0076   2.3141   1.2227  -4.3151   7.9423   3.1940  -4.7718  -1.1548   0.4918  -7.0006   1.9687
 -2.1551  -3.0943  -0.8667   4.9329   4.0249  12.1362   1.8735  -4.4112   2.0674   0.5694   6.4150
 -5.1670  -2.7446   1.0594  -1.0877   7.5416   4.7113  -0.8547   1.1882   3.3744   0.0683  -4.0410
 -9.2958   2.9871   8.6292  -5.3787  -1.8889  -4.7470  -5.5222  -0.0254  -5.0104   4.8762   4.8037
 6.0658  -0.3248   2.2099  -0.9975   4.2162  -4.2710  -2.4843  -8.4630  -3.2816  -4.0110   2.0273
 -0.1326  -4.9630  -3.8989  -6.7670   2.9377   2.7765   3.9984   1.2210  -5.2284   2.3058  -6.0643
 10.9108   6.7109   5.4590
"""
TFJS_ASTRONAUT = np.array(TFJS_TEXT.split(), dtype=np.float64)
TFJS_COSINE_WITH_MIRROR = 0.9279  # the same slice mirrored, in the same run


def astronaut_slice(astronaut: np.ndarray) -> np.ndarray:
    """A 112 px face from the astronaut by slicing alone (no interpolation to differ)."""
    return astronaut[51:163, 168:280]


# ---- the ops, each against a direct reference -------------------------------------------------


def reference_conv(x, w, stride, dilation, pads, depthwise=False):
    """NHWC convolution by its definition: out[n, i, j] = sum over the window, in float64."""
    x = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw = w.shape[:2]
    oh = (x.shape[1] - (kh - 1) * dilation - 1) // stride + 1
    ow = (x.shape[2] - (kw - 1) * dilation - 1) // stride + 1
    out = []
    for i in range(oh):
        row = []
        for j in range(ow):
            top, left = i * stride, j * stride
            patch = x[
                :,
                top : top + (kh - 1) * dilation + 1 : dilation,
                left : left + (kw - 1) * dilation + 1 : dilation,
            ]
            if depthwise:  # channel c, multiplier m -> output channel c * M + m
                row.append(np.einsum("nhwc,hwcm->ncm", patch, w).reshape(len(x), -1))
            else:
                row.append(np.einsum("nhwc,hwco->no", patch, w))
        out.append(np.stack(row, axis=1))
    return np.stack(out, axis=1)


# TF's "SAME": output ceil(size / stride), padding split with the odd pixel after. Worked out
# by hand from TF's documentation: (size, kernel, stride, dilation) -> (before, after).
SAME_CASES = [
    ((7, 3, 2, 1), (1, 1)),
    ((6, 3, 2, 1), (0, 1)),
    ((6, 4, 1, 1), (1, 2)),
    ((6, 3, 1, 2), (2, 2)),
    ((5, 1, 2, 1), (0, 0)),
    ((112, 3, 2, 1), (0, 1)),
]


@pytest.mark.parametrize("case, expected", SAME_CASES)
def test_same_padding_is_tfs(case, expected):
    assert spatial_padding(*case) == expected


CONV_CASES = [  # height, width, kernel, stride, dilation, padding
    (7, 6, 3, 2, 1, "SAME"),
    (6, 6, 4, 1, 1, "SAME"),
    (6, 7, 3, 1, 2, "SAME"),
    (7, 7, 3, 2, 1, "VALID"),
    (5, 6, 3, 1, 1, "EXPLICIT"),
]


def conv_pads(height, width, kernel, stride, dilation, padding):
    if padding == "SAME":
        return spatial_padding(height, kernel, stride, dilation), spatial_padding(
            width, kernel, stride, dilation
        )
    if padding == "EXPLICIT":
        return (1, 2), (0, 1)
    return (0, 0), (0, 0)


@pytest.mark.parametrize("height, width, kernel, stride, dilation, padding", CONV_CASES)
def test_conv2d_matches_its_definition(height, width, kernel, stride, dilation, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, height, width, 3)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 3, 5)).astype(np.float32)
    pads = conv_pads(height, width, kernel, stride, dilation, padding)
    ours = conv2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        strides=[1, stride, stride, 1],
        padding=padding,
        dilations=[1, dilation, dilation, 1],
        explicit=[0, 0, *pads[0], *pads[1], 0, 0],
    )
    expected = reference_conv(x, w, stride, dilation, pads)
    assert ours.shape == expected.shape
    if padding == "SAME":
        assert ours.shape[1:3] == (-(-height // stride), -(-width // stride))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("height, width, kernel, stride, dilation, padding", CONV_CASES)
def test_depthwise_conv2d_matches_its_definition(height, width, kernel, stride, dilation, padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, height, width, 3)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 3, 2)).astype(np.float32)  # channel multiplier 2
    pads = conv_pads(height, width, kernel, stride, dilation, padding)
    ours = depthwise_conv2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        strides=[1, stride, stride, 1],
        padding=padding,
        dilations=[1, dilation, dilation, 1],
        explicit=[0, 0, *pads[0], *pads[1], 0, 0],
    )
    expected = reference_conv(x, w, stride, dilation, pads, depthwise=True)
    assert ours.shape == expected.shape and ours.shape[-1] == 6
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4)


def test_pad_matmul_and_channel_checks():
    x = torch.arange(2 * 2 * 3 * 2, dtype=torch.float32).reshape(2, 2, 3, 2)
    paddings = torch.tensor([[0, 0], [1, 2], [0, 1], [0, 0]])  # TF order: N, H, W, C
    expected = np.pad(x.numpy(), ((0, 0), (1, 2), (0, 1), (0, 0)))
    np.testing.assert_array_equal(pad(x, paddings).numpy(), expected)
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    assert torch.allclose(matmul(a, b, transpose_b=True), a @ b.T)
    assert torch.allclose(matmul(a.T, b.T, transpose_a=True), a @ b.T)
    with pytest.raises(GraphError, match="input channels"):
        conv2d(torch.zeros(1, 4, 4, 3), torch.zeros(3, 3, 2, 4))


# ---- the interpreter on a small graph written here --------------------------------------------


def small_graph(op: str = "Conv2D", data_format: str = "NHWC") -> tuple[dict, dict]:
    """Pad -> convolution -> Reshape (flatten) -> MatMul -> AddV2 -> PReLU as TF writes it,
    with the nodes in no particular order, and its weights."""
    rng = np.random.default_rng(2)
    weights = {
        "paddings": np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32),
        "filters": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
        "shape": np.array([-1, 4 * 4 * 4], np.int32),
        "kernel": rng.standard_normal((64, 3)).astype(np.float32),
        "bias": rng.standard_normal(3).astype(np.float32),
        "zero": np.zeros((), np.float32),
        "gamma": np.full(3, 0.25, np.float32),
    }

    def node(name, kind, inputs=(), **attr):
        return {"name": name, "op": kind, "input": list(inputs), "attr": attr}

    def text(value: str) -> dict:
        import base64

        return {"s": base64.b64encode(value.encode()).decode()}

    convolution = node(
        "conv",
        op,
        ["padded", "filters"],
        strides={"list": {"i": ["1", "2", "2", "1"]}},
        padding=text("VALID"),
        data_format=text(data_format),
    )
    nodes = [
        node("out", "AddV2", ["positive", "negative"]),
        node("negative", "Mul", ["gamma", "low"]),
        node("low", "Minimum", ["zero", "biased"]),
        node("positive", "Maximum", ["zero", "biased"]),
        node("biased", "AddV2", ["dense", "bias"]),
        node("dense", "MatMul", ["flat", "kernel"], transpose_a={"b": False}),
        node("flat", "Reshape", ["conv:0", "shape"]),
        convolution,
        node("padded", "Pad", ["x", "paddings"]),
        node("x", "Placeholder"),
    ] + [node(name, "Const") for name in weights]
    graph = {
        "format": "graph-model",
        "modelTopology": {"node": nodes},
        "signature": {"outputs": {"out:0": {"name": "out:0"}}},
    }
    return graph, weights


def test_interpreter_runs_a_graph_in_dependency_order():
    graph, weights = small_graph()
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 2)).astype(np.float32)
    ours = TFGraph(graph, weights)(torch.from_numpy(x)).numpy()
    conv = reference_conv(x, weights["filters"], 2, 1, ((1, 1), (1, 1)))  # (2, 4, 4, 4)
    dense = conv.reshape(2, -1) @ weights["kernel"] + weights["bias"]  # flattened as NHWC
    expected = np.maximum(dense, 0) + 0.25 * np.minimum(dense, 0)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_interpreter_refuses_what_it_does_not_run():
    graph, weights = small_graph(op="Conv3D")
    with pytest.raises(GraphError, match="Conv3D"):
        TFGraph(graph, weights)
    graph, weights = small_graph(data_format="NCHW")
    with pytest.raises(GraphError, match="NHWC"):
        TFGraph(graph, weights)
    graph, weights = small_graph()
    del weights["kernel"]
    with pytest.raises(GraphError, match="kernel"):
        TFGraph(graph, weights)
    graph, weights = small_graph()
    graph["modelTopology"]["node"][0]["input"].append("^positive")  # a control dependency
    with pytest.raises(GraphError, match="control"):
        TFGraph(graph, weights)


def test_read_weights_dequantizes_and_counts_bytes():
    values = np.array([0, 128, 255], np.uint8)
    shape = np.array([7, -1], np.int32)
    data = values.tobytes() + shape.tobytes()
    quantization = {"dtype": "uint8", "scale": 0.5, "min": -1.0}
    manifest = [
        {
            "paths": ["shard.bin"],
            "weights": [
                {"name": "q", "shape": [3], "dtype": "float32", "quantization": quantization},
                {"name": "shape", "shape": [2], "dtype": "int32"},
            ],
        }
    ]
    tensors = read_weights(manifest, {"shard.bin": data}.__getitem__)
    np.testing.assert_allclose(tensors["q"], [-1.0, 63.0, 126.5])
    assert tensors["q"].dtype == np.float32
    np.testing.assert_array_equal(tensors["shape"], [7, -1])
    with pytest.raises(GraphError, match="bytes"):
        read_weights(manifest, {"shard.bin": data + b"\0"}.__getitem__)


# ---- geometry: our 64 px crop and a full photo onto the ArcFace template ----------------------


def dots(size: int, points: np.ndarray) -> np.ndarray:
    """A black size px image with a white 3x3 dot at each point (pixel indices)."""
    image = np.zeros((size, size, 3), np.uint8)
    for x, y in np.round(points).astype(int):
        image[y - 1 : y + 2, x - 1 : x + 2] = 255
    return image


def centres(chip: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The brightness-weighted centre of the chip near each expected point."""
    gray = chip.astype(np.float64).mean(axis=-1)
    found = []
    for x, y in np.round(points).astype(int):
        window = gray[y - 5 : y + 6, x - 5 : x + 6]
        ys, xs = np.mgrid[y - 5 : y + 6, x - 5 : x + 6]
        found.append([(window * xs).sum() / window.sum(), (window * ys).sum() / window.sum()])
    return np.array(found)


@pytest.mark.parametrize("framing", [DEFAULT_FRAMING, LEGACY_FRAMING])
def test_crop_template_lands_on_the_arcface_template(framing):
    graph, weights = small_graph()  # to_chip does not use the network
    recognizer = MobileFaceRecognizer(TFGraph(graph, weights), face_size=64, framing=framing)
    points = template_pixels(64, framing)
    faces = torch.from_numpy(dots(64, points)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        chip = recognizer.to_chip(faces)[0].permute(1, 2, 0).numpy()
    # The dots sit at whole pixels: where the rounding moved them, scaled onto the chip.
    side = mobileface.crop_side_on_chip(64, framing)
    expected = ARCFACE_TEMPLATE + (np.round(points) - points) * side / 64
    assert np.abs(centres(chip, ARCFACE_TEMPLATE) - expected).max() < 0.3
    # What the crop does not cover: the chip square less the crop's square on it (about half
    # of the chip by default, the top rows in the looser legacy framing).
    low = ARCFACE_TEMPLATE[0] + (-0.5 - points[0]) * side / 64  # the crop's corner on the chip
    covered = np.clip(np.r_[low, low + side], -0.5, 111.5)
    share = 1 - (covered[2] - covered[0]) * (covered[3] - covered[1]) / 112**2
    assert mobileface.chip_outside_crop(64, framing) == pytest.approx(share, abs=0.01)


def test_photo_chip_puts_the_landmarks_on_the_template():
    angle, scale, shift = 0.2, 2.5, np.array([180.3, 140.6])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE - 56) @ rotation.T * scale + shift
    photo = Image.fromarray(dots(400, landmarks)).filter(ImageFilter.GaussianBlur(2))
    chip = photo_chip(np.asarray(photo), landmarks)
    assert chip.shape == (112, 112, 3)
    # The dots were drawn at whole photo pixels: their rounding, scaled onto the chip.
    moved = (np.round(landmarks) - landmarks) @ rotation / scale
    assert np.abs(centres(chip, ARCFACE_TEMPLATE) - (ARCFACE_TEMPLATE + moved)).max() < 0.3


# ---- the real network ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recognizer() -> MobileFaceRecognizer:
    if mobileface.missing_files():
        pytest.skip(f"MobileFace is not installed: run {mobileface.INSTALL_HINT}")
    return MobileFaceRecognizer.from_pretrained()


def test_graph_matches_tfjs(recognizer, astronaut):
    face = astronaut_slice(astronaut)
    chips = torch.from_numpy(np.stack([face, face[:, ::-1]]).copy()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        both = recognizer.embed_chips(chips)
        alone = recognizer.embed_chips(chips[:1])
    assert both.shape == (2, mobileface.EMBEDDING_SIZE)
    np.testing.assert_allclose(both[0].numpy(), TFJS_ASTRONAUT, atol=5e-4)
    np.testing.assert_allclose(alone[0].numpy(), both[0].numpy(), atol=1e-4)  # batch-free
    assert cosine(both[0], both[1]).item() == pytest.approx(TFJS_COSINE_WITH_MIRROR, abs=1e-3)


def test_recognizer_is_frozen_and_checks_shapes(recognizer):
    assert not any(p.requires_grad for p in recognizer.parameters())
    recognizer.train()
    assert not recognizer.training
    with pytest.raises(ValueError, match="shape"):
        recognizer(torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="112"):
        recognizer.embed_chips(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expected shape"):  # the graph's own input shape
        recognizer.network(torch.zeros(1, 3, 112, 112))


PHOTOS = ("astronaut", "grace_hopper", "camera")


@pytest.fixture(scope="module")
def embeddings(request, aligner, recognizer) -> dict[str, torch.Tensor]:
    """64 px crops of each photo, its mirror image and a shifted, shrunk copy."""
    from agecgan.align import read_photo

    faces = {}
    for name in PHOTOS:
        photo = read_photo(request.getfixturevalue(name))[0]
        shifted = photo.crop((20, 10, photo.width, photo.height))
        shifted = shifted.resize((shifted.width * 3 // 4, shifted.height * 3 // 4))
        faces[name] = aligner(photo).image
        faces[f"{name} mirrored"] = aligner(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).image
        faces[f"{name} shifted"] = aligner(shifted).image
    pixels = torch.from_numpy(np.stack([np.asarray(face) for face in faces.values()]))
    with torch.no_grad():
        vectors = recognizer(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1)
    return dict(zip(faces, vectors, strict=True))


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("change", ["mirrored", "shifted"])
def test_same_person_is_above_the_threshold(embeddings, name, change):
    assert cosine(embeddings[name], embeddings[f"{name} {change}"]) > SAME_PERSON_THRESHOLD


@pytest.mark.parametrize(
    "first, second", [(a, b) for i, a in enumerate(PHOTOS) for b in PHOTOS[i + 1 :]]
)
def test_different_people_are_below_the_threshold(embeddings, first, second):
    for change in ("", " mirrored", " shifted"):
        assert cosine(embeddings[first], embeddings[second + change]) < SAME_PERSON_THRESHOLD


def test_full_photo_embedding_agrees_with_the_crop(recognizer, aligner, embeddings, astronaut):
    with torch.no_grad():
        full = recognizer.embed_photo(astronaut, aligner)
    assert full.shape == (mobileface.EMBEDDING_SIZE,)
    assert cosine(full, embeddings["astronaut"]) > SAME_PERSON_THRESHOLD
    assert cosine(full, embeddings["grace_hopper"]) < SAME_PERSON_THRESHOLD


# ---- the files: checked, never downloaded at run time -----------------------------------------


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(MobileFaceMissingError, match="make install-all"):
        MobileFaceRecognizer.from_pretrained(tmp_path)


@needs_weights
def test_install_keeps_checked_files_and_refuses_damaged_ones(tmp_path, monkeypatch, capsys):
    for name in mobileface.FILES:
        shutil.copy(mobileface.FOLDER / name, tmp_path / name)
    monkeypatch.setenv("PATH", "")  # no npm: present files need none
    assert mobileface.install(tmp_path) is True
    graph = tmp_path / "mobileface.json"
    graph.write_text(json.dumps(json.loads(graph.read_text())))  # same content, other bytes
    assert mobileface.missing_files(tmp_path) == ["mobileface.json"]
    with pytest.raises(MobileFaceMissingError, match="mobileface.json"):
        MobileFaceRecognizer.from_pretrained(tmp_path)
    assert mobileface.install(tmp_path) is False  # would fetch again, but there is no npm
    assert "npm not found" in capsys.readouterr().out
