import pytest
import torch

from modsquad.core.errors import ConfigError
from modsquad.models.heads import ClassificationHead, ConvHead, LinearPatchHead, build_head
from modsquad.tasks import get_task


def test_linear_patch_head_unpatchify_layout():
    """Pixel (i*p + r, j*p + s) of channel c comes from token i*w + j, output feature (r*p + s)*C + c."""
    b, h, w, p, c, d = 2, 3, 2, 4, 3, 8
    head = LinearPatchHead(d, c, p)
    x = torch.randn(b, h * w, d)
    out = head(x, (h, w))
    assert out.shape == (b, c, h * p, w * p)
    y = head.proj(x)
    for i in range(h):
        for j in range(w):
            for r in range(p):
                for s in range(p):
                    torch.testing.assert_close(out[:, :, i * p + r, j * p + s],
                                               y[:, i * w + j, (r * p + s) * c:(r * p + s + 1) * c])


@pytest.mark.parametrize("patch_size", [4, 8, 14, 16])
def test_conv_head_reaches_full_resolution(patch_size):
    head = ConvHead(32, 5, patch_size)
    out = head(torch.randn(2, 6, 32), (2, 3))
    assert out.shape == (2, 5, 2 * patch_size, 3 * patch_size)


def test_conv_head_upsampling_stages():
    head = ConvHead(64, 1, 16)
    assert len(head.stages) == 4
    assert head.pred.in_channels == 16  # 64 -> 32 -> 16 -> 16 (min_channels) -> 16


def test_classification_head_mean_pools():
    head = ClassificationHead(16, 7)
    x = torch.randn(3, 10, 16)
    out = head(x, (2, 5))
    assert out.shape == (3, 7)
    torch.testing.assert_close(out, head.fc(head.norm(x.mean(1))))


def test_build_head_by_task_kind():
    assert isinstance(build_head(get_task("normal"), 32, 8, "linear"), LinearPatchHead)
    assert isinstance(build_head(get_task("semseg"), 32, 8, "conv"), ConvHead)
    assert isinstance(build_head(get_task("class_object"), 32, 8, "conv"), ClassificationHead)
    with pytest.raises(ConfigError, match="head"):
        build_head(get_task("normal"), 32, 8, "mlp")
