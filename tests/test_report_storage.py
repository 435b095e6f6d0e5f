"""What the interactive report keeps of a long run: the token x token attention of a bounded, evenly spread set of
passes (the latest always), so a run of 1000 passes holds what one of REPORT_ROW_PASSES does."""

import timm
import torch

from lightning_attn import ProbeOptions, ProbeRunner
from lightning_attn.html_report import report_data
from lightning_attn.probes import Probes
from lightning_attn.runner import REPORT_ROW_PASSES


def grey_vit(seed):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()


def test_report_rows_kept_for_a_bounded_evenly_spread_set_of_passes():
    """A long run must not keep every pass's token x token attention: at most REPORT_ROW_PASSES, the latest in."""
    vit = grey_vit(5)
    runner = ProbeRunner(vit, Probes(torch.rand(1, 3, 32, 32)), ProbeOptions(tile_size=16, report_layers=(0,)))
    for step in range(3 * REPORT_ROW_PASSES):
        runner.run(step, render=False)
        kept = [i for i, e in enumerate(runner.report_history) if e["matrices"]]
        assert len(kept) <= REPORT_ROW_PASSES and kept[-1] == step
        stride = runner.state_dict()["report_row_stride"]
        assert all(i % stride == 0 for i in kept[:-1])
    assert len(runner.report_history) == 3 * REPORT_ROW_PASSES  # the maps of every pass stay
    assert len(kept) > REPORT_ROW_PASSES // 2
    # the page picks its passes with rows among those the state kept
    data = report_data(runner.state_dict(), max_row_passes=10)
    with_rows = [i for i, p in enumerate(data["passes"]) if p["matrices"]]
    assert len(with_rows) == 10 and with_rows[-1] == 3 * REPORT_ROW_PASSES - 1
