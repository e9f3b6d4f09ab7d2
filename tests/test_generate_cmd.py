"""`pangudraw generate`: one image through the command line."""
import numpy as np
import pytest
from PIL import Image

from diffusion.model import GenerationRequest, PanGuDraw
from diffusion.tiny import build_random_model
from jobs.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("cli") / "tiny", seed=5)


def test_generate_writes_the_image_of_the_api(model_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "蓝色背景上的红色圆形 a red circle", "--model", str(model_dir), "--seed", "7",
               "--width", "128", "--height", "32", "--steps", "6", "--sampler", "dpmpp_2m", "--out", str(out)])
    assert rc == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (32, 128, 3)
    expected = PanGuDraw.load(model_dir).generate([GenerationRequest(
        "蓝色背景上的红色圆形 a red circle", 7, width=128, height=32, steps=6, sampler="dpmpp_2m")])[0]
    np.testing.assert_array_equal(img, expected)
    assert "128x32, bucket 10" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--width", "64"], "both --width and --height"),
    (["--out", "x.gif"], ".png, .jpg or .webp"),
    (["--steps", "0"], "steps must be in 1..1000"),
    (["--aspect", "wide"], "W:H"),
])
def test_user_mistakes_get_a_message_not_a_traceback(model_dir, tmp_path, capsys, argv, message):
    argv = ["generate", "a cat", "--model", str(model_dir), *argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_model_directory(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
