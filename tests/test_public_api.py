"""The top-level API: `modsquad.load_model(run)` loads a full run, `modsquad.load_extracted(dir)` one task."""

import torch

import modsquad
from modsquad.checkpoint import save_model
from modsquad.models import MultiTaskViT


def test_load_model_from_a_run_folder_and_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MultiTaskViT(["depth_euclidean", "normal"], img_size=32, patch_size=16, embed_dim=32, depth=2,
                         num_heads=2, attn_experts=4, attn_top_k=2, mlp_experts=4, mlp_top_k=2).eval()
    path = save_model(tmp_path / "run" / "last.safetensors", model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for source in (tmp_path / "run", path):
            got = modsquad.load_model(source)(x)
            for task in expected:
                torch.testing.assert_close(got[task], expected[task], rtol=0, atol=0)  # same shapes, same maths
    assert "load_model" in modsquad.__all__
