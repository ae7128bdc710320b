"""Tests of FR (dlib's ResNet): identity on real photos, agreement with dlib, frozen, converter."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from torch import nn

from agecgan import FaceRecognizer
from agecgan.convert_face_api import ConversionError, main, read_tfjs, to_state_dict
from agecgan.face_recognition import (
    SAME_PERSON_THRESHOLD,
    DlibResNet,
    InceptionResnetRecognizer,
    chip_matrix,
    distance,
)

PHOTOS = ("astronaut", "grace_hopper", "camera")
TF_LEAVES = {
    "conv.weight": "conv/filters",
    "conv.bias": "conv/bias",
    "scale": "scale/weights",
    "offset": "scale/biases",
}

# dlib itself, once (dlib-bin 20.0.1, face-recognition-models 0.3.0, in a throwaway venv):
# get_frontal_face_detector() found the astronaut at [(175, 76) (265, 166)];
# shape_predictor_5_face_landmarks.dat put these landmarks on it; get_face_chip(photo, shape,
# size=150, padding=0.25) cut the chip and dlib_face_recognition_resnet_model_v1.dat's
# compute_face_descriptor(chip) gave this descriptor (same as on the photo and shape).
ASTRONAUT_DLIB_LANDMARKS = np.array([[255, 104], [238, 105], [195, 101], [212, 103], [224, 135]])
DLIB_DESCRIPTOR_TEXT = """
-0.0663  0.0209  0.0176 -0.0642 -0.1525 -0.0192 -0.0387 -0.1182  0.1051 -0.1089  0.1737
-0.0512 -0.2694 -0.0429  0.0117  0.1557 -0.1505 -0.1679 -0.1454 -0.0834  0.0325  0.0461
-0.0077  0.0530 -0.2693 -0.2736 -0.0628 -0.0995  0.0173 -0.0709 -0.0403  0.0865 -0.0964
 0.0395  0.1120  0.1228 -0.0045 -0.1140  0.1247 -0.0650 -0.2490 -0.0227  0.0713  0.1813
 0.2966 -0.0508 -0.0050 -0.0875  0.1324 -0.2840  0.0185  0.0860  0.0533  0.0917  0.0332
-0.1590  0.0020  0.2393 -0.2848 -0.0536  0.0045 -0.1799 -0.0436 -0.0419  0.1367  0.1216
-0.1847 -0.1403  0.1848 -0.2430  0.0009  0.0710 -0.1130 -0.1775 -0.3130 -0.0162  0.4356
 0.1833 -0.1791 -0.0224 -0.0414  0.0183  0.0282  0.0363 -0.0495 -0.1103 -0.1265  0.0503
 0.2054 -0.0594  0.0400  0.2325  0.0356 -0.0130  0.0369  0.1189 -0.1553 -0.0592 -0.0781
-0.0227 -0.0457 -0.0550  0.0575  0.1615 -0.1102  0.1955 -0.0109 -0.0396 -0.0187 -0.0565
 0.0087 -0.0897  0.1297 -0.2501  0.0583  0.1776  0.0784  0.1821 -0.0129  0.0422 -0.0406
-0.0558 -0.1782 -0.0290  0.0313 -0.0500  0.0275  0.0155
"""  # all 128 values, rounded to 4 decimals
ASTRONAUT_DLIB_DESCRIPTOR = np.array(DLIB_DESCRIPTOR_TEXT.split(), dtype=np.float64)


@pytest.fixture(scope="module")
def fr() -> FaceRecognizer:
    return FaceRecognizer.from_pretrained()


def as_faces(images: list[Image.Image]) -> torch.Tensor:
    """Aligned 64x64 PIL faces -> (N, 3, 64, 64) in [-1, 1]."""
    pixels = np.stack([np.asarray(image) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def mildly_changed(photo: Image.Image) -> Image.Image:
    """The same photo at 80% size, 15% brighter and cropped by 5% of its width on the left."""
    small = photo.resize(
        (round(photo.width * 0.8), round(photo.height * 0.8)), Image.Resampling.BICUBIC
    )
    small = small.crop((round(small.width * 0.05), 0, small.width, small.height))
    return ImageEnhance.Brightness(small).enhance(1.15)


@pytest.fixture(scope="module")
def embeddings(request, aligner, fr) -> dict[str, torch.Tensor]:
    """Each photo, its mirror image and a mildly changed copy, aligned and embedded by FR."""
    from agecgan.align import read_photo

    faces = {}
    for name in PHOTOS:
        photo = read_photo(request.getfixturevalue(name))[0]
        faces[name] = aligner(photo).image
        faces[f"{name} mirrored"] = aligner(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).image
        faces[f"{name} changed"] = aligner(mildly_changed(photo)).image
    with torch.no_grad():
        vectors = fr(as_faces(list(faces.values())))
    return dict(zip(faces, vectors, strict=True))


def test_output_shape_and_threshold(fr):
    with torch.no_grad():
        assert fr(torch.zeros(2, 3, 64, 64)).shape == (2, 128)
    assert SAME_PERSON_THRESHOLD == 0.6
    with pytest.raises(ValueError, match="shape"):
        fr(torch.zeros(2, 3, 150, 150))


@pytest.mark.parametrize(
    "first, second", [(a, b) for i, a in enumerate(PHOTOS) for b in PHOTOS[i + 1 :]]
)
def test_different_people_are_apart(embeddings, first, second):
    # Measured 0.72 (astronaut, Hopper), 0.84 (astronaut, cameraman), 0.75 (Hopper, cameraman).
    assert distance(embeddings[first], embeddings[second]) > SAME_PERSON_THRESHOLD


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("change", ["mirrored", "changed"])
def test_same_person_is_close(embeddings, name, change):
    # Measured mirrored / changed: astronaut 0.17 / 0.13, Hopper 0.17 / 0.08, cameraman (a 3/4
    # view, which mirroring changes most) 0.40 / 0.14.
    assert distance(embeddings[name], embeddings[f"{name} {change}"]) < SAME_PERSON_THRESHOLD


def test_port_matches_dlib_on_dlibs_chip(fr, astronaut):
    """Independent reference: dlib's own descriptor of the astronaut's chip (see above)."""
    import cv2

    # dlib's chip geometry; dlib truncates its bilinear samples, so warp in float and floor.
    matrix = chip_matrix(ASTRONAUT_DLIB_LANDMARKS)
    chip = np.floor(cv2.warpAffine(astronaut.astype(np.float32), matrix, (150, 150)))
    with torch.no_grad():
        ours = fr.embed_chips(torch.from_numpy(chip).permute(2, 0, 1)[None])[0].double().numpy()
    reference = ASTRONAUT_DLIB_DESCRIPTOR
    cosine = ours @ reference / np.linalg.norm(ours) / np.linalg.norm(reference)
    # Measured: cosine 0.99967, largest difference 0.009 (face-api's uint8 copy of the weights).
    assert cosine > 0.999
    np.testing.assert_allclose(ours, reference, atol=0.02)


def test_frozen_inside_a_training_parent(fr):
    parent = nn.Sequential(nn.Conv2d(3, 3, 1), fr)
    parent.train()
    assert not fr.training and not any(module.training for module in fr.modules())
    assert not any(parameter.requires_grad for parameter in fr.parameters())
    assert sum(p.numel() for p in parent.parameters() if p.requires_grad) == 12  # the conv only


def test_gradients_reach_the_input(fr):
    faces = torch.zeros(2, 3, 64, 64).uniform_(-1, 1).requires_grad_()
    distance(fr(faces)[0], fr(faces.flip(0))[0]).backward()
    assert faces.grad is not None and torch.isfinite(faces.grad).all()
    assert faces.grad.abs().sum() > 0


def test_optional_backbone_builds_without_download(monkeypatch):
    module = pytest.importorskip("facenet_pytorch.models.inception_resnet_v1")

    def no_download(*args, **kwargs):
        raise AssertionError("weights=None must not download")

    monkeypatch.setattr(module, "load_weights", no_download)
    backbone = InceptionResnetRecognizer(weights=None)
    nn.Sequential(backbone).train()
    assert not backbone.training
    with torch.no_grad():
        out = backbone(torch.zeros(2, 3, 64, 64).uniform_(-1, 1))
    assert out.shape == (2, 512)
    assert not any(parameter.requires_grad for parameter in backbone.parameters())


def tf_name(key: str) -> str:
    """DlibResNet's state-dict key -> face-api's tensor name."""
    if key == "fc.weight":
        return "fc"
    key = key.removeprefix("blocks.")
    for ours, theirs in TF_LEAVES.items():
        if key.endswith(f".{ours}"):
            return f"{key[: -len(ours) - 1].replace('.', '/')}/{theirs}"
    raise KeyError(key)


def write_tfjs(folder, state: dict[str, torch.Tensor]) -> None:
    """DlibResNet's state dict as face-api lays it out: TF layouts, mostly uint8-quantized."""
    specs, chunks = [], []
    for key, value in state.items():
        array = value.numpy()
        array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
        spec = {"name": tf_name(key), "shape": list(array.shape), "dtype": "float32"}
        if array.ndim == 4 and array.shape[-1] == 64:  # face-api keeps these float32, too
            chunks.append(array.astype(np.float32).tobytes())
        else:
            low, scale = float(array.min()), float(np.ptp(array)) / 255 or 1.0
            spec["quantization"] = {"dtype": "uint8", "min": low, "scale": scale}
            chunks.append(np.round((array - low) / scale).astype(np.uint8).tobytes())
        specs.append(spec)
    (folder / "face_recognition_model.bin").write_bytes(b"".join(chunks))
    manifest = [{"paths": ["face_recognition_model.bin"], "weights": specs}]
    (folder / "face_recognition_model-weights_manifest.json").write_text(json.dumps(manifest))


def test_converter_round_trip(tmp_path):
    original = DlibResNet().state_dict()
    write_tfjs(tmp_path, original)
    out = tmp_path / "out" / "weights.safetensors"
    main([str(tmp_path), "--out", str(out)])
    FaceRecognizer.from_pretrained(out)  # loads strictly
    converted = to_state_dict(read_tfjs(tmp_path))
    for key, value in original.items():
        step = float(value.max() - value.min()) / 255  # uint8 quantization
        torch.testing.assert_close(converted[key], value, atol=step / 2 + 1e-6, rtol=0)


def test_converter_rejects_a_missing_tensor(tmp_path):
    state = DlibResNet().state_dict()
    del state["fc.weight"]
    write_tfjs(tmp_path, state)
    with pytest.raises(ConversionError, match="fc.weight"):
        to_state_dict(read_tfjs(tmp_path))
