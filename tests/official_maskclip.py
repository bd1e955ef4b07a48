"""MaskCLIP's official key smoothing and prompt denoising, transcribed for the parity tests.

chongzhou96/MaskCLIP 245d31f809be9c1938f8f30561b6bf9ed033d746: `refine_output` of
mmseg/models/decode_heads/maskclip_head.py; `refine_clip_output` of
mmseg/models/decode_heads/maskclip_plus_head.py is the same code (the MaskCLIP+ teacher).
"""

import torch.nn.functional as F


def refine_output(output, k, pd_thresh, ks_thresh):
    """output: cosines (N, C, H, W); k: keys (N, HW, Ck) or None. Modifies `output` as the official code."""
    if pd_thresh > 0:
        N, C, H, W = output.shape
        _output = F.softmax(output * 100, dim=1)
        max_cls_conf = _output.view(N, C, -1).max(dim=-1)[0]
        selected_cls = (max_cls_conf < pd_thresh)[:, :, None, None].expand(N, C, H, W)
        output[selected_cls] = -100

    if k is not None and ks_thresh > 0:
        output = F.softmax(output * 100, dim=1)
        N, C, H, W = output.shape
        output = output.view(N, C, -1).transpose(-2, -1)
        k = F.normalize(k, p=2)
        weight = k @ k.transpose(-2, -1)

        selected_pos = (output.max(dim=-1, keepdim=True)[0] < ks_thresh)
        selected_pos = selected_pos.expand(-1, -1, C)

        weighted_output = weight @ output
        output[selected_pos] = weighted_output[selected_pos]
        output = output.transpose(-2, -1).view(N, C, H, W)

    return output
