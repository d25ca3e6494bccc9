"""Member masks: a decode step's one-row masks are the first row of its K-row masks."""

import torch

from roe.cache import first_member, member_masks


def test_first_member_equals_the_one_row_masks():
    pos_BP = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])  # prompt 0 is left-padded
    valid_BP = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    pos_B = torch.tensor([4, 6])
    windows = {"full_attention": None, "sliding_attention": 3}
    wide = member_masks(windows, pos_BP, valid_BP, pos_B[:, None].expand(2, 5), torch.float32)
    one = member_masks(windows, pos_BP, valid_BP, pos_B[:, None], torch.float32)
    cut = first_member(wide, pos_BP.shape[1])
    assert cut.keys() == one.keys() and all(torch.equal(cut[t], one[t]) for t in one)
    single = member_masks({"full_attention": None}, pos_BP, valid_BP, pos_B[:, None].expand(2, 5), torch.float32)
    assert torch.equal(first_member(single, 6),
                       member_masks({"full_attention": None}, pos_BP, valid_BP, pos_B[:, None], torch.float32))
